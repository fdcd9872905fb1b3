"""Decoding and download rules of ``worker.imaging`` on real bytes and a real local server."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from worker.imaging import ImageError, decode


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_16_bit_greyscale_png_decodes_to_its_high_byte_not_to_white():
    grey = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 20).astype(np.uint16)
    data = _png(grey)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    decoded = decode(data, max_pixels=10**6)
    assert decoded.tensor.shape == (3, 48, 64)
    expected = (grey >> 8).astype(np.uint8)
    for channel in range(3):
        assert np.array_equal(decoded.tensor[channel].numpy(), expected)


def test_an_8_bit_png_still_decodes_exactly():
    rgb = np.random.default_rng(1).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    assert np.array_equal(decode(_png(rgb), max_pixels=10**6).tensor.permute(1, 2, 0).numpy(), rgb)


def test_a_floating_point_image_is_an_error_result_not_a_guess():
    buffer = io.BytesIO()
    Image.fromarray(np.ones((8, 8), dtype=np.float32)).save(buffer, format="TIFF")
    with pytest.raises(ImageError) as raised:
        decode(buffer.getvalue(), max_pixels=10**6)
    assert raised.value.reason == "not_an_image" and "F" in str(raised.value)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _pillow_rgb(data: bytes) -> np.ndarray:
    """What ADC's worker makes of the bytes: Pillow, then ``convert("RGB")``."""
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))


def test_a_cmyk_jpeg_decodes_to_pillows_rgb_pixels():
    """libjpeg-turbo's CMYK-to-RGB conversion rounds otherwise than Pillow's (ADC's decoder): most
    pixels came out one level apart."""
    rgb = np.random.default_rng(2).integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    data = _jpeg(Image.fromarray(rgb).convert("CMYK"))
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    decoded = decode(data, max_pixels=10**6)
    assert np.array_equal(decoded.tensor.permute(1, 2, 0).numpy(), _pillow_rgb(data))


def test_a_jpeg_with_a_recoverable_flaw_decodes_as_pillow_decodes_it():
    """Stray bytes before the end marker are a libjpeg warning: Pillow ignores it, so ADC's worker
    classifies such an image; the pixels are all there."""
    rgb = np.random.default_rng(3).integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    whole = _jpeg(Image.fromarray(rgb))
    assert whole.endswith(b"\xff\xd9")
    data = whole[:-2] + b"\x00\x11\x22\x33" + whole[-2:]
    buffers: list[torch.Tensor] = []
    decoded = decode(data, max_pixels=10**6,
                     allocate=lambda height, width: buffers.append(torch.zeros((height, width, 3), dtype=torch.uint8))
                     or buffers[-1])
    assert np.array_equal(decoded.tensor.permute(1, 2, 0).numpy(), _pillow_rgb(data))
    assert decoded.tensor.data_ptr() == buffers[0].data_ptr()  # still in the loader's shared buffer
    assert np.array_equal(decoded.tensor.numpy(), decode(whole, max_pixels=10**6).tensor.numpy())


def test_a_truncated_jpeg_is_still_a_corrupt_image():
    rgb = np.random.default_rng(4).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    data = _jpeg(Image.fromarray(rgb))
    with pytest.raises(ImageError) as raised:
        decode(data[: len(data) // 2], max_pixels=10**6)
    assert raised.value.reason == "corrupt"


# --- download rules, against the real local server and a small redirecting server on loopback

import socket  # noqa: E402
import struct  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

from worker.imaging import MAX_REDIRECTS, download, image_session  # noqa: E402


class _Hops(BaseHTTPRequestHandler):
    """``/hop/N`` redirects to ``/hop/N-1``; ``/hop/0`` to ``server.target``; ``/to-file`` to a
    file:// URL; ``/reset-once/X`` resets the first connection for X (RST before any answer),
    then redirects to ``server.target``; ``/stall`` sends part of a body, then nothing for 3 s."""

    protocol_version = "HTTP/1.1"
    reset: set[str] = set()

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        self.server.requests += 1  # type: ignore[attr-defined]
        if self.path.startswith("/reset-once/") and self.path not in self.reset:
            self.reset.add(self.path)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        if self.path in ("/unsized", "/short"):
            self._send_body()
            return
        if self.path == "/stall":  # headers and the body's first 4 KiB, then nothing for 3 s
            body = self.server.body  # type: ignore[attr-defined]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:4096])
            self.wfile.flush()
            time.sleep(3)
            self.close_connection = True
            return
        if self.path.startswith("/hop/") and self.path != "/hop/0":
            location = f"/hop/{int(self.path.rsplit('/', 1)[1]) - 1}"
        elif self.path == "/to-file":
            location = "file:///etc/passwd"
        else:
            location = self.server.target  # type: ignore[attr-defined]
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_body(self) -> None:
        """``/unsized``: the image with no Content-Length, ended by closing the connection;
        ``/short``: a Content-Length 1,000 bytes longer than the image, then the close."""
        body = self.server.body  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if self.path == "/short":
            self.send_header("Content-Length", str(len(body) + 1000))
        self.send_header("Connection", "close")
        self.end_headers()
        for start in range(0, len(body), 4096):  # several reads for the client
            self.wfile.write(body[start:start + 4096])
            self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


def _reserved_image_url(antenna, image) -> tuple[int, str]:
    """(job, the image URL of its one task) for a new job of ``image`` on ``antenna``."""
    from worker.antenna import AntennaClient
    from tests.conftest import TOKEN

    job = antenna.add_job([image], "synthetic-moths")
    client = AntennaClient(antenna.base_url, TOKEN)
    image_url = client.reserve_tasks(job, 1)[0].image_url
    client.close()
    return job, image_url


@pytest.fixture
def hops(antenna, tiny_images):
    _job, image_url = _reserved_image_url(antenna, tiny_images[0])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hops)
    server.daemon_threads = True
    server.target, server.requests = image_url, 0  # type: ignore[attr-defined]
    server.body = tiny_images[0].path.read_bytes()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server, image_url, tiny_images[0].path.read_bytes()
    server.shutdown()
    server.server_close()


def _get(url: str, **kwargs) -> bytearray:
    with image_session(2) as session:
        return download(session, url, max_bytes=10**8, timeout_s=10.0, **kwargs)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x.jpg", "http:///x.jpg", "gopher://h/x"])
def test_a_url_that_is_not_http_is_a_bad_url_error(url):
    with pytest.raises(ImageError) as raised:
        _get(url)
    assert raised.value.reason == "bad_url"


@pytest.mark.timeout(30)
def test_redirects_are_followed_at_most_max_redirects_times_and_only_to_http(hops):
    server, _image_url, real = hops
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    assert _get(f"{origin}/hop/{MAX_REDIRECTS - 1}") == real  # MAX_REDIRECTS redirects: fine
    for url in (f"{origin}/hop/{MAX_REDIRECTS}", f"{origin}/to-file"):
        with pytest.raises(ImageError) as raised:
            _get(url)
        assert raised.value.reason == "bad_url", url


@pytest.mark.timeout(30)
def test_private_hosts_are_refused_only_when_asked(hops):
    server, image_url, real = hops
    assert _get(image_url) == real  # loopback is allowed by default (tests and on-premises servers)
    for url in (image_url, f"http://localhost:{server.server_address[1]}/hop/0"):
        with pytest.raises(ImageError) as raised:
            _get(url, block_private_hosts=True)
        assert raised.value.reason == "bad_url" and "AMI_BLOCK_PRIVATE_IMAGE_HOSTS" in str(raised.value)
    redirected = f"http://127.0.0.1:{server.server_address[1]}/hop/0"
    with pytest.raises(ImageError):
        _get(redirected, block_private_hosts=True)


@pytest.mark.timeout(60)
def test_transient_5xx_and_a_reset_are_retried_for_image_gets(antenna, hops):
    server, image_url, real = hops
    before = antenna.report(antenna.job_ids()[0]).media_bytes_served
    antenna.set_faults("media", [503, 502])
    assert _get(image_url) == real  # two 5xx answers, then the image
    assert antenna.report(antenna.job_ids()[0]).media_bytes_served == before + len(real)
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    served = server.requests
    assert _get(f"{origin}/reset-once/a") == real  # a reset before the answer, then the redirect
    assert server.requests == served + 2
    antenna.set_faults("media", [503] * 10)
    with pytest.raises(ImageError) as raised:
        _get(image_url)
    assert raised.value.reason == "http_error" and "HTTP 503" in str(raised.value)


# --- the image session and the environment: proxies honoured, netrc credentials never sent


class _Proxy(BaseHTTPRequestHandler):
    """A forward proxy stand-in on loopback: records each request line and answers the image
    itself (``server.body``), as a proxy that fetched it would."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        self.server.seen.append(self.path)  # type: ignore[attr-defined]
        body = self.server.body  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def proxy(tiny_images):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    server.daemon_threads = True
    server.seen, server.body = [], tiny_images[0].path.read_bytes()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.timeout(30)
def test_the_environments_proxy_is_used_for_image_hosts_and_no_proxy_bypasses_it(proxy, monkeypatch):
    """Operators behind a proxy set HTTP(S)_PROXY; the session reads them once per host."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with image_session(2) as session:
        for _ in range(2):
            assert download(session, "http://images.invalid/a/b.jpg", max_bytes=10**8, timeout_s=10.0) == proxy.body
    assert proxy.seen == ["http://images.invalid/a/b.jpg"] * 2  # absolute form: a proxied request
    monkeypatch.setenv("NO_PROXY", "images.invalid")
    with image_session(2) as session, pytest.raises(ImageError) as raised:
        download(session, "http://images.invalid/a/b.jpg", max_bytes=10**8, timeout_s=10.0)
    assert raised.value.reason == "connection" and len(proxy.seen) == 2  # direct: the name does not resolve


@pytest.mark.timeout(30)
def test_netrc_credentials_never_reach_an_image_host(antenna, tiny_images, loopback_netrc):
    """No Authorization header goes to image hosts, not even one requests would build from a
    ~/.netrc entry for that host (``NETRC`` points requests at one)."""
    job, image_url = _reserved_image_url(antenna, tiny_images[0])
    assert _get(image_url) == tiny_images[0].path.read_bytes()
    assert antenna.report(job).media_requests_with_auth == 0


@pytest.mark.timeout(60)
def test_a_declared_body_is_read_into_one_buffer_of_its_size(antenna, large_images):
    """With a Content-Length, the body goes into one buffer of that size as it arrives: no
    regrowing buffer (which copied the body over and over and held up to 1.125x of it per
    download in flight). The shaped link delivers it in many reads."""
    image = large_images[0]
    antenna.set_network(bandwidth_bytes_per_s=40_000_000)
    _job, image_url = _reserved_image_url(antenna, image)
    body = _get(image_url)
    assert body == image.path.read_bytes()
    assert body.__alloc__() == len(body) + 1  # exactly its size (plus the trailing NUL bytearray keeps)


@pytest.mark.timeout(30)
def test_a_body_without_length_is_read_to_the_close_and_a_short_one_is_a_connection_error(hops):
    server, _image_url, expected = hops
    base = f"http://127.0.0.1:{server.server_address[1]}"
    assert _get(f"{base}/unsized") == expected
    with pytest.raises(ImageError) as raised:
        _get(f"{base}/short")
    assert raised.value.reason == "connection"


@pytest.fixture
def copied_reads(monkeypatch) -> list:
    """One entry per read copied in through urllib3's ``read1`` while the test runs (it still reads)."""
    import urllib3.response

    copied: list = []
    read1 = urllib3.response.HTTPResponse.read1
    monkeypatch.setattr(urllib3.response.HTTPResponse, "read1",
                        lambda self, *args, **kwargs: copied.append(1) or read1(self, *args, **kwargs))
    return copied


@pytest.mark.timeout(60)
def test_a_declared_body_is_read_straight_into_its_buffer_and_the_connection_is_kept(antenna, large_images,
                                                                                      copied_reads):
    """The socket's reads land in the body's buffer (no read copied through urllib3's ``read1``:
    without that copy a large image costs the client 28% less CPU), and the connection goes back to the
    pool once the body is whole: the second image reuses it."""
    image = large_images[0]
    antenna.set_network(bandwidth_bytes_per_s=40_000_000)  # many socket reads per body
    _job, first_url = _reserved_image_url(antenna, image)
    _job, second_url = _reserved_image_url(antenna, image)
    with image_session(1) as session:
        assert download(session, first_url, max_bytes=10**8, timeout_s=10.0) == image.path.read_bytes()
        assert download(session, second_url, max_bytes=10**8, timeout_s=10.0) == image.path.read_bytes()
        pools = session.get_adapter(first_url).poolmanager.pools
        pool, = (pools[key] for key in pools.keys())
        assert (pool.num_connections, pool.num_requests) == (1, 2)
    assert copied_reads == []


@pytest.mark.timeout(60)
def test_reads_into_the_body_follow_the_rate_so_the_deadline_holds_on_a_slow_host(antenna, large_images):
    """Each read into the body waits for its whole size, so its size follows the rate seen so far:
    on a 20 kB/s host a 1 s deadline ends the download after tens of kB, not after one 256 KiB read
    (13 s there)."""
    antenna.set_network(bandwidth_bytes_per_s=20_000)
    job, image_url = _reserved_image_url(antenna, large_images[0])
    with pytest.raises(ImageError) as raised:
        _get(image_url, deadline_s=1.0)
    served = antenna.report(job).media_bytes_served
    assert raised.value.reason == "timeout" and "AMI_IMAGE_DOWNLOAD_DEADLINE_S" in str(raised.value)
    assert served < 100 * 1024, served


def test_a_body_from_a_source_that_is_not_http_client_is_copied_in_read_by_read(copied_reads):
    """Any other raw response (a library's own) goes through the copied reads: the same body."""
    import requests
    import urllib3

    from worker.imaging import CHUNK_BYTES, _read_sized

    data = bytes(range(256)) * 3000
    wrapped = requests.Response()
    wrapped.raw = urllib3.HTTPResponse(body=io.BytesIO(data), headers={"Content-Length": str(len(data))},
                                       preload_content=False)
    assert _read_sized(wrapped, "u", len(data), 0.0, 1e9) == data
    assert len(copied_reads) == -(-len(data) // CHUNK_BYTES)


@pytest.mark.timeout(30)
def test_a_body_that_stops_arriving_is_a_timeout_after_one_read_timeout(hops):
    """A read into the body waits at most the read timeout for its next bytes, as a copied read did."""
    server, _image_url, _expected = hops
    with image_session(1) as session, pytest.raises(ImageError) as raised:
        download(session, f"http://127.0.0.1:{server.server_address[1]}/stall", max_bytes=10**8, timeout_s=1.0)
    assert raised.value.reason == "timeout" and "a read took over 1 s" in str(raised.value)
