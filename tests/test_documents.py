"""PDFs for a text-only model, through the official SDKs: the text layer page by page in every dialect, on both
upstreams, in user content and in tool results; a PDF that cannot be read is a clear 400 in the dialect's shape,
naming the file, with nothing sent upstream; the bounds (pages, characters, time, memory) hold against hostile
files, and the event loop stays free meanwhile."""

import asyncio
import base64

import anthropic
import openai
import pdfs
import pytest
from conftest import API_KEY, MODEL, ROOT, state_of

import k2proxy

REPORT = pdfs.pdf(["Quarterly report\nRevenue rose (a lot).", "Page two: costs fell."])
EXPECTED = ["File: report.pdf (PDF, 2 pages)", "--- page 1 ---\nQuarterly report\nRevenue rose (a lot).",
            "--- page 2 ---\nPage two: costs fell."]


MEDIA = {"pdf": "application/pdf", "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document"}


def as_base64(data):
    return base64.b64encode(data).decode()


def media_of(name):
    return MEDIA[name.rsplit(".", 1)[1]]


def anthropic_document(data, name="report.pdf"):
    return {"type": "document", "title": name, "source": {"type": "base64", "media_type": media_of(name),
                                                          "data": as_base64(data)}}


def chat_file(data, name="report.pdf"):
    return {"type": "file", "file": {"filename": name, "file_data": f"data:{media_of(name)};base64," + as_base64(data)}}


def responses_file(data, name="report.pdf"):
    return {"type": "input_file", "filename": name, "file_data": f"data:{media_of(name)};base64," + as_base64(data)}


class Dialect:
    """One client API through its SDK: a user turn holding a file, sent and answered."""

    def __init__(self, kind, url):
        self.kind = kind
        self.anthropic = anthropic.AsyncAnthropic(base_url=url, api_key=API_KEY, max_retries=0, timeout=30)
        self.openai = openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)

    async def send(self, data, name="report.pdf", in_tool_result=False):
        ask = [{"type": "text", "text": "Summarise this."}]
        if self.kind == "anthropic":
            block = anthropic_document(data, name)
            if in_tool_result:
                messages = [{"role": "user", "content": "Read the report."},
                            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Read",
                                                               "input": {"file_path": name}}]},
                            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                          "content": [block]}]}]
            else:
                messages = [{"role": "user", "content": [*ask, block]}]
            return await self.anthropic.messages.create(model=MODEL, max_tokens=512, messages=messages)
        if self.kind == "chat":
            return await self.openai.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": [*ask, chat_file(data, name)]}])
        return await self.openai.responses.create(
            model=MODEL, input=[{"role": "user", "content": [{"type": "input_text", "text": "Summarise this."},
                                                              responses_file(data, name)]}])

    async def close(self):
        await self.anthropic.close()
        await self.openai.close()


@pytest.fixture
async def dialect(make_proxy, api_proxy):
    """(kind, upstream, settings) → a Dialect on a proxy in front of the fake site or the fake API."""
    made = []

    async def start(kind, upstream="site", **env):
        proxy = await (api_proxy(**env) if upstream == "api" else make_proxy(**env))
        made.append(Dialect(kind, str(proxy.make_url("")).rstrip("/")))
        return made[-1]
    yield start
    for client in made:
        await client.close()


EACH_DIALECT = pytest.mark.parametrize("kind", ["anthropic", "chat", "responses"])


def sent_text(upstream, fake, fake_api):
    """The text of every message the upstream received last."""
    messages = (fake_api.received[-1] if upstream == "api" else fake.received[-1]).body["messages"]
    return "\n".join(str(message.get("content")) for message in messages)


@EACH_DIALECT
@pytest.mark.parametrize("upstream", ["site", "api"])
async def test_a_pdfs_text_reaches_the_model_page_by_page_with_its_name(dialect, fake, fake_api, kind, upstream):
    client = await dialect(kind, upstream)
    await client.send(REPORT)
    text = sent_text(upstream, fake, fake_api)
    assert all(piece in text for piece in EXPECTED) and "%PDF" not in text


@pytest.mark.parametrize("upstream", ["site", "api"])
async def test_a_pdf_in_a_tool_result_reaches_the_model(dialect, fake, fake_api, upstream):
    """Claude Code's Read tool returns a PDF as a document block in its tool_result."""
    client = await dialect("anthropic", upstream)
    await client.send(REPORT, in_tool_result=True)
    assert all(piece in sent_text(upstream, fake, fake_api) for piece in EXPECTED)


UNREADABLE = {
    "a scan": (pdfs.scan(), "report.pdf", "no text layer"),
    "encrypted": (pdfs.encrypted(), "report.pdf", "is encrypted"),
    "broken": (b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 9 0 R >> endobj\ngarbage\n%%EOF\n", "report.pdf",
               "cannot be read as a PDF"),
    "cut short": (REPORT[:len(REPORT) // 2], "report.pdf", "broken or cut short"),
    "not a PDF": (b"Just some words, not a PDF at all.", "report.pdf", "is not one"),
    "a DOCX": (b"PK\x03\x04\x14\x00\x06\x00" + bytes(64), "notes.docx", "cannot be read by the model"),
    "deeply nested": (pdfs.nested(), "report.pdf", "report.pdf"),
}


@EACH_DIALECT
@pytest.mark.parametrize("case", UNREADABLE)
async def test_a_document_the_model_cannot_read_is_a_400_naming_it_and_nothing_goes_upstream(dialect, fake, kind,
                                                                                          case):
    data, name, says = UNREADABLE[case]
    client = await dialect(kind)
    error = anthropic.BadRequestError if kind == "anthropic" else openai.BadRequestError
    with pytest.raises(error) as raised:
        await client.send(data, name=name)
    message = str(raised.value)
    assert name in message and says in message and fake.received == []
    if kind == "anthropic":
        assert raised.value.body["type"] == "error" and raised.value.body["error"]["type"] == "invalid_request_error"
    else:
        assert raised.value.body["param"]


async def test_without_pypdf_the_400_names_the_file_and_the_command_that_installs_it(dialect, fake, monkeypatch):
    monkeypatch.setattr(k2proxy, "PDF_READER", k2proxy.PDF_READER.replace("from pypdf import", "from no_pypdf import"))
    client = await dialect("chat")
    with pytest.raises(openai.BadRequestError) as raised:
        await client.send(REPORT)
    assert "report.pdf" in str(raised.value) and "pip install -r requirements-pdf.txt" in str(raised.value)
    assert raised.value.body["code"] == "pdf_reader_missing" and fake.received == []


async def test_the_pages_read_are_capped_and_the_text_says_where_it_stopped(dialect, fake):
    client = await dialect("chat", MAX_PDF_PAGES="3")
    await client.send(pdfs.pdf([f"Page {number} says hello." for number in range(1, 8)]))
    text = sent_text("site", fake, None)
    assert "--- page 3 ---\nPage 3 says hello." in text and "page 4" not in text
    assert "[the text stops after page 3 of 7: MAX_PDF_PAGES]" in text


async def test_the_characters_kept_are_capped_and_the_text_says_where_it_stopped(dialect, fake):
    client = await dialect("anthropic", MAX_PDF_CHARS="1000")
    await client.send(pdfs.pdf(["x" * 600, "y" * 600, "z" * 600]))
    text = sent_text("site", fake, None)
    assert "x" * 600 in text and "y" * 400 in text and "y" * 401 not in text and "z" not in text
    assert "[the text stops in page 2 of 3: MAX_PDF_CHARS]" in text


async def test_max_file_mb_applies_to_a_pdf(dialect, fake):
    client = await dialect("chat", MAX_FILE_MB="0.01")
    with pytest.raises(openai.APIStatusError) as raised:
        await client.send(pdfs.pdf([f"Line {n}" for n in range(2000)]))
    assert raised.value.status_code == 413 and "MAX_FILE_MB" in str(raised.value) and fake.received == []


HOSTILE = {
    "a stream that inflates to 2 GB": (pdfs.bomb(2048), {}),
    "too long to read in time": (pdfs.pdf([f"Page {n}." for n in range(1500)]), {"PDF_SECONDS": "0.1",
                                                                               "MAX_PDF_PAGES": "1500"}),
}


@pytest.mark.parametrize("case", HOSTILE)
async def test_a_hostile_pdf_stops_at_its_limits_with_a_400(dialect, fake, case):
    data, env = HOSTILE[case]
    client = await dialect("anthropic", **env)
    with pytest.raises(anthropic.BadRequestError) as raised:
        await client.send(data)
    assert "report.pdf" in str(raised.value) and fake.received == []


def readers_running():
    """The PDF readers running now: processes whose command line is the reader's script."""
    import pathlib
    found = 0
    for process in pathlib.Path("/proc").glob("[0-9]*"):
        try:
            found += b"PdfReader" in (process / "cmdline").read_bytes()
        except OSError:
            continue
    return found


async def test_the_event_loop_serves_others_while_a_long_pdf_is_read(make_proxy, fake):
    """Reading runs in a process of its own: /health answers while a 1,500-page PDF is being read."""
    proxy = await make_proxy(MAX_PDF_PAGES="1500")
    long = pdfs.pdf([f"Page {number} of a long report." for number in range(1500)])
    client = Dialect("chat", str(proxy.make_url("")).rstrip("/"))
    reading = asyncio.ensure_future(client.send(long))
    try:
        async with asyncio.timeout(30):
            while not readers_running():
                await asyncio.sleep(0.01)  # polled: a process starting sends no event here
            assert (await proxy.get("/health")).status == 200
            assert readers_running() and not reading.done(), "answered while the PDF was still being read"
            await reading
    finally:
        await client.close()
    assert "--- page 1500 ---" in sent_text("site", fake, None)


async def test_a_pdf_waits_for_room_in_the_memory_budget_while_it_is_read(make_proxy, fake, monkeypatch):
    """The reader may take PDF_MEMORY_MB, counted in MEMORY_BUDGET_MB (half of it at most): with no room, a 503."""
    monkeypatch.setattr(k2proxy, "BODY_WAIT_SECONDS", 0.2)
    proxy = await make_proxy(MEMORY_BUDGET_MB="300", PDF_MEMORY_MB="256")
    await state_of(proxy).budget.admit(200 * 1024 * 1024)  # other bodies hold two thirds: no room for half
    client = Dialect("chat", str(proxy.make_url("")).rstrip("/"))
    try:
        with pytest.raises(openai.APIStatusError) as raised:
            await client.send(REPORT)
    finally:
        await client.close()
    assert raised.value.status_code == 503 and raised.value.body["code"] == "busy" and fake.received == []


async def test_a_reader_larger_than_the_memory_budget_holds_all_of_it_while_it_reads(make_proxy, fake):
    proxy = await make_proxy(MEMORY_BUDGET_MB="100", MAX_REQUEST_MB="8", PDF_MEMORY_MB="256")
    client = Dialect("chat", str(proxy.make_url("")).rstrip("/"))
    try:
        await client.send(REPORT)
    finally:
        await client.close()
    assert all(piece in sent_text("site", fake, None) for piece in EXPECTED) and state_of(proxy).budget.used == 0


def test_the_proxy_itself_never_imports_pypdf():
    """pypdf is imported by the reader's process only: the proxy's idle memory does not grow with it."""
    import ast
    tree = ast.parse((ROOT / "k2proxy.py").read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom) and node.module}
    assert "pypdf" not in imported and "from pypdf import PdfReader" in k2proxy.PDF_READER


def test_requirements_pdf_pins_pypdf_and_the_image_installs_it():
    assert "pypdf==" in (ROOT / "requirements-pdf.txt").read_text()
    assert "requirements-pdf.txt" in (ROOT / "Dockerfile").read_text()
