# k2proxy: one Python file and aiohttp, on Alpine, run by the non-root user k2proxy (uid 10001); pypdf too
# (requirements-pdf.txt, pure Python), which reads the text of PDFs in messages in a process of its own.
# aiohttp and its dependencies ship musllinux wheels, so nothing is compiled: no build tools, one stage.
FROM python:3.12.12-alpine3.23

# For replicas that share one Redis (REDIS_URL, WORKERS; docs/replicas.md): docker build --build-arg WITH_REDIS=1
# adds the redis package (requirements-redis.txt). Left empty, the image holds aiohttp and pypdf.
ARG WITH_REDIS=

# Token, account, API key and IFM key files (and the generated keys) live on the /data volume; .env comes from `docker run --env-file` or compose.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    USER_TOKENS_FILE=/data/tokens.txt \
    GUEST_TOKENS_FILE=/data/tokens_guest.txt \
    ACCOUNTS_FILE=/data/accounts.txt \
    API_KEYS_FILE=/data/api_keys.txt \
    IFM_KEYS_FILE=/data/ifm_keys.txt \
    GENERATED_KEY_FILE=/data/k2proxy_key.txt \
    COMPACTION_KEY_FILE=/data/k2proxy_compaction_key.txt

WORKDIR /app
COPY requirements.txt requirements-pdf.txt requirements-redis.txt ./
RUN pip install --no-cache-dir -r requirements.txt -r requirements-pdf.txt \
 && if [ -n "$WITH_REDIS" ]; then pip install --no-cache-dir -r requirements-redis.txt; fi \
 && addgroup -g 10001 k2proxy \
 && adduser -D -H -u 10001 -G k2proxy -s /sbin/nologin k2proxy \
 && mkdir -p /data \
 && chown k2proxy:k2proxy /data
# Owned by root: the proxy can read its code but not change it.
COPY k2proxy.py admin.html ./

USER k2proxy
VOLUME ["/data"]
EXPOSE 8001
# Standard library only; follows PORT; ignores HTTP(S)_PROXY; any failure (refused, timeout, non-200) exits 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request as r; s = r.build_opener(r.ProxyHandler({})).open('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8001'), timeout=4).status; sys.exit(0 if s == 200 else 1)"]
CMD ["python", "k2proxy.py"]
