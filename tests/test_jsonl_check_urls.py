"""`touchvl validate --check-urls`: no SSRF, a total deadline per URL, a size cap, signed URLs never printed.

Real HTTP(S) servers on 127.0.0.1; the positive path reaches them only through the fetcher's test-only
`allow_networks` (and `allow_http`), which the command line never sets.
"""
import datetime as dt
import io
import ipaddress
import json
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from PIL import Image

from tests.loopback import LoopbackServer
from touchvl.chat.fetch import FetchError, UrlFetcher, address_problem, redact_urls
from touchvl.chat.validate import MAX_IMAGE_BYTES, validate_file

ROOT = Path(__file__).resolve().parents[1]
LOCAL = dict(allow_http=True, allow_networks=("127.0.0.1/32",))


def _png(size=(1024, 1024)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (9, 99, 199)).save(buf, format="PNG")
    return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    """/img.png an image; /redirect?to=URL a 302; /trickle a byte every 0.2 s (for at most 20 s); /huge 20 MB;
    /silent accepts and never answers (at most 20 s)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        state = self.server.state
        state["hits"].append(self.path)
        if self.path.startswith("/img.png"):
            self._send(200, state["png"], "image/png")
        elif self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.path.split("to=", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path.startswith("/trickle"):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(100):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)
        elif self.path.startswith("/huge"):
            self.send_response(200)
            self.send_header("Content-Length", str(20 * 2**20))
            self.end_headers()
            try:
                for _ in range(20):
                    self.wfile.write(b"\0" * 2**20)
            except OSError:
                pass
        elif self.path.startswith("/silent"):
            time.sleep(20)
        else:
            self._send(404, b"no", "text/plain")

    def _send(self, status, body, kind):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server():
    with LoopbackServer(Handler, {"hits": [], "png": _png()}) as srv:
        yield srv


def _example(url, detail="high"):
    return {"messages": [{"role": "system", "content": "You describe how things feel."},
                         {"role": "user", "content": [{"type": "text", "text": "How does this feel?"},
                                                      {"type": "image_url", "image_url": {"url": url, "detail": detail}}]},
                         {"role": "assistant", "content": "It feels smooth, hard and slightly glossy."}]}


def _file(tmp_path, urls, name="f.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(_example(u)) + "\n" for u in urls))
    return path


def _findings(report, code="image_unreachable"):
    return {f.line: f.message for f in report.errors if f.code == code}


def test_default_check_urls_never_fetches_loopback_private_or_plain_http(tmp_path, server):
    port = server.server_address[1]
    urls = [f"http://127.0.0.1:{port}/img.png", f"https://127.0.0.1:{port}/img.png", f"https://localhost:{port}/img.png",
            f"https://[::1]:{port}/img.png", f"https://[::ffff:127.0.0.1]:{port}/img.png", "https://10.1.2.3/img.png",
            "https://192.168.0.1/img.png", "https://169.254.169.254/latest/meta-data/img.png", "https://0.0.0.0/img.png",
            "https://100.64.0.1/img.png", "https://[64:ff9b::7f00:1]/img.png", "https://224.0.0.1/img.png",
            "http://93.184.216.34/img.png"]
    report = validate_file(_file(tmp_path, urls), check_urls=True)
    found = _findings(report)
    assert sorted(found) == list(range(1, len(urls) + 1)), report.errors
    assert all("refused" in m for m in found.values()), found
    assert "loopback" in found[2] and "private" in found[6] and "link-local" in found[8] and "https" in found[13]
    assert server.state["hits"] == []  # not one request reached the local server


@pytest.mark.parametrize("address,problem", [("127.0.0.1", "loopback"), ("10.0.0.1", "private"), ("172.16.5.4", "private"),
                                             ("169.254.169.254", "link-local"), ("::1", "loopback"), ("fe80::1%eth0", "link-local"),
                                             ("fc00::1", "private"), ("::ffff:10.0.0.1", "private"), ("2002:7f00:1::", "loopback"),
                                             ("64:ff9b::a00:1", "address"), ("255.255.255.255", "private"), ("8.8.8.8", None),
                                             ("2001:4860:4860::8888", None)])
def test_address_classes(address, problem):
    got = address_problem(address)
    assert (got is None) if problem is None else (problem in got), got


def test_positive_path_and_redirects_are_checked_at_every_hop(tmp_path, server):
    fetch = UrlFetcher(**LOCAL)
    origin = server.origin
    assert fetch(f"{origin}/img.png") == server.state["png"]
    assert fetch(f"{origin}/redirect?to=/img.png") == server.state["png"]  # a redirect to an allowed address is followed
    for target in ("http://127.0.0.2:9/img.png", "http://169.254.169.254/latest/meta-data/", "http://[::1]:9/",
                   "file:///etc/passwd", "http://10.0.0.1/x.png"):
        with pytest.raises(FetchError, match="refused"):
            fetch(f"{origin}/redirect?to={target}")
    with pytest.raises(FetchError, match="redirects"):
        UrlFetcher(max_redirects=2, **LOCAL)(f"{origin}/redirect?to={origin}/redirect?to={origin}/redirect?to=/img.png")
    # the validator costs a fetched image by its real size
    report = validate_file(_file(tmp_path, [f"{origin}/img.png", f"{origin}/missing.png"]), check_urls=True, fetch=fetch)
    assert report.summary.image_tokens == 765 and _findings(report) == {2: "messages[1].content[1]: "
                                                                          f"{origin}/missing.png could not be fetched (FetchError: HTTP 404)"}


def test_a_trickling_or_silent_server_is_cut_at_the_deadline(server):
    fetch = UrlFetcher(deadline_s=1.5, **LOCAL)
    for path in ("/trickle", "/silent", "/redirect?to=/trickle"):
        start = time.monotonic()
        with pytest.raises(FetchError, match="deadline"):
            fetch(server.origin + path)
        assert time.monotonic() - start < 3.0, path


def test_size_cap(tmp_path, server):
    start = time.monotonic()
    data = UrlFetcher(**LOCAL)(server.origin + "/huge")
    assert len(data) == MAX_IMAGE_BYTES + 1 and time.monotonic() - start < 10
    report = validate_file(_file(tmp_path, [server.origin + "/huge"]), check_urls=True, fetch=UrlFetcher(**LOCAL))
    assert [f.code for f in report.errors] == ["image_too_large"]


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_with_the_certificate_checked_for_the_host_name(tmp_path):
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    with LoopbackServer(Handler, {"hits": [], "png": _png((64, 64))}) as srv:
        srv.socket = server_ctx.wrap_socket(srv.socket, server_side=True)
        port = srv.server_address[1]
        trusted = ssl.create_default_context(cafile=str(cert))
        fetch = UrlFetcher(allow_networks=("127.0.0.1/32",), ssl_context=trusted)  # https only: no allow_http
        assert fetch(f"https://localhost:{port}/img.png") == srv.state["png"]
        with pytest.raises(FetchError, match="https"):
            fetch(f"http://localhost:{port}/img.png")
        with pytest.raises(FetchError):  # the system's trust store does not know this certificate
            UrlFetcher(allow_networks=("127.0.0.1/32",))(f"https://localhost:{port}/img.png")


SIGNED = "https://{host}/tvl/tac/image_3_tac.jpg?OSSAccessKeyId=LTAI5tSECRETKEYID&Expires=1900000000&Signature=SeCrEtSiGnAtUrE%3D"


def test_signed_urls_are_redacted_in_findings_stdout_and_every_report(tmp_path, server):
    urls = [SIGNED.format(host=f"127.0.0.1:{server.server_address[1]}"), SIGNED.format(host="bucket.oss.invalid"),
            "https://user:pa55word@bucket.oss.invalid/x.jpg", "ftp://h/x.jpg?Signature=SeCrEtSiGnAtUrE"]
    path = _file(tmp_path, urls)
    proc = subprocess.run([sys.executable, "-m", "touchvl", "validate", str(path), "--check-urls", "--report-dir",
                           str(tmp_path / "r"), "--url-timeout", "5"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "image_unreachable" in proc.stdout and "Traceback" not in proc.stderr
    outputs = {"stdout": proc.stdout, "stderr": proc.stderr,
               **{name: (tmp_path / "r" / name).read_text() for name in ("report.json", "report.md", "report.html")}}
    for where, text in outputs.items():
        for secret in ("SeCrEtSiGnAtUrE", "LTAI5tSECRETKEYID", "pa55word"):
            assert secret not in text, (where, secret)
    assert "/tvl/tac/image_3_tac.jpg?…" in outputs["report.md"]
    assert server.state["hits"] == []


def test_redact_urls():
    assert redact_urls("x https://h.com/a.jpg?Signature=abc&b=1 y") == "x https://h.com/a.jpg?… y"
    assert redact_urls("'https://u:p@h.com:8/a?b'") == "'https://h.com:8/a?…'"
    assert redact_urls("https://h.com/a.jpg and data:image/png;base64,AAAA") == "https://h.com/a.jpg and data:image/png;base64,AAAA"


def test_image_urls_read_for_training_or_serving_are_fetched_safely_too(server):
    """messages.read_image_url (the local trainer's dataset images, the model server's request images) fetches
    through the same UrlFetcher: a JSONL or a request cannot make it reach loopback or private addresses."""
    from touchvl.chat.messages import read_image_url
    from touchvl.errors import StageError

    port = server.server_address[1]
    for url in (f"http://127.0.0.1:{port}/img.png", f"https://127.0.0.1:{port}/img.png?Signature=SeCrEt",
                "https://169.254.169.254/latest/meta-data/x.png"):
        with pytest.raises(StageError, match="refused") as caught:
            read_image_url(url, "line 1")
        assert "SeCrEt" not in str(caught.value)
    assert server.state["hits"] == []


def test_report_html_loads_nothing_a_data_file_points_at(tmp_path):
    """Opening a report must not make the reviewer's browser request a URL from the file (no <img src=http...>)."""
    import base64

    png = "data:image/png;base64," + base64.b64encode(_png((8, 8))).decode()
    path = _file(tmp_path, ["http://192.168.1.1/cgi-bin/reboot.png", png, "https://tracker.example/p.png?u=42"])
    proc = subprocess.run([sys.executable, "-m", "touchvl", "validate", str(path), "--report-dir", str(tmp_path / "r")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    page = (tmp_path / "r/report.html").read_text()
    assert '<img src="data:image/png;base64,' in page and "[image: http://192.168.1.1/cgi-bin/reboot.png]" in page
    assert '<img src="http' not in page and "img-src data:" in page and "u=42" not in page
