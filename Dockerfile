# k2proxy: one Python file and aiohttp, on Alpine, as a non-root user.
FROM python:3.12.7-alpine3.20

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    USER_TOKENS_FILE=/data/tokens.txt \
    GUEST_TOKENS_FILE=/data/tokens_guest.txt \
    ACCOUNTS_FILE=/data/accounts.txt

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt \
 && adduser -D -H -u 10001 -s /sbin/nologin k2proxy \
 && mkdir -p /data \
 && chown k2proxy:k2proxy /data
COPY k2proxy.py admin.html ./

USER k2proxy
VOLUME ["/data"]
EXPOSE 8001
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8001') + '/health', timeout=4)"]
CMD ["python", "k2proxy.py"]
