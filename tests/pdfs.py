"""Real PDFs for the tests, written by hand as the format says (objects, a cross-reference table, a trailer):
with a text layer, without one (a scan's shape), encrypted (by pypdf), cut short, broken, and hostile."""

import io
import zlib


def escaped(text):
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def written(objects):
    """A PDF of these objects (bytes each, numbered from 1), the first the catalog."""
    out, offsets = io.BytesIO(), []
    out.write(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    start = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.write(b"".join(b"%010d 00000 n \n" % offset for offset in offsets))
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, start))
    return out.getvalue()


def stream(data, compress=False):
    if compress:
        data = zlib.compress(data)
        return b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(data) + data + b"\nendstream"
    return b"<< /Length %d >>\nstream\n" % len(data) + data + b"\nendstream"


def pdf(pages, contents=None):
    """A PDF whose pages show these texts (one line per line of each), in Helvetica; `contents` gives each page's
    content stream instead (bytes, or None for a page with no content, as a scan's image alone would be)."""
    contents = contents or [b"BT /F1 12 Tf 14 TL 72 720 Td " + b" T* ".join(
        b"(" + escaped(line).encode("latin-1") + b") Tj" for line in text.split("\n")) + b" ET" for text in pages]
    count = len(contents)
    kids = b" ".join(b"%d 0 R" % (4 + 2 * index) for index in range(count))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, count),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for index, content in enumerate(contents):
        page = 4 + 2 * index
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >>"
                       + (b" /Contents %d 0 R" % (page + 1) if content is not None else b"") + b" >>")
        objects.append(stream(content or b""))
    return written(objects)


def scan(pages=2):
    """A PDF of pages with nothing to read in them: what a scan is without its text layer."""
    return pdf([], contents=[None] * pages)


def encrypted(text="Secret plans."):
    """A PDF that opens only with its password (RC4, which pypdf writes without another library)."""
    from pypdf import PdfReader, PdfWriter
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf([text]))))
    writer.encrypt(user_password="hunter2", owner_password="owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def bomb(megabytes=2048):
    """A page whose content stream inflates to `megabytes` of text from a few MB: a reader that inflates it whole
    runs out of memory."""
    chunk = b"BT /F1 12 Tf 72 720 Td (" + b"A" * (1 << 20) + b") Tj ET\n"
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(chunk) for _ in range(megabytes)) + packer.flush()
    return pdf([], contents=[b""]).replace(stream(b""), b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(data)
                                           + data + b"\nendstream", 1)


def nested(depth=200000):
    """A PDF whose page holds an array nested `depth` deep: a recursive reader's stack runs out."""
    return written([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                    b"<< /Type /Page /Parent 2 0 R /Annots " + b"[" * depth + b"]" * depth + b" >>"])
