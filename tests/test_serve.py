"""`ctsearch serve` on Ray Serve (the session's Ray), reached over HTTP on 127.0.0.1 only: the API,
bad requests, the bearer token, uploads, privacy, the sharded deployment's exactness, and the page
in a real headless Chromium."""

from __future__ import annotations

import io
import json
import socket
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ctsearch.index.format import HIT_COLUMNS

TOKEN = "test-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(
    base: str, path: str, token: str | None = TOKEN, data: bytes | None = None
) -> tuple[int, dict, bytes]:
    """(status, headers, body) of GET (or POST with ``data``) base + path."""
    req = urllib.request.Request(base + path, data=data, method="POST" if data is not None else "GET")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/octet-stream")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def get_json(base: str, path: str, **kw):
    status, _, body = call(base, path, **kw)
    assert status == 200, body
    return json.loads(body)


def one_line_error(status: int, body: bytes, expected: int) -> str:
    assert status == expected, body
    err = json.loads(body)["error"]
    assert "\n" not in err and "Traceback" not in err and "/dev/shm" not in err
    return err


@pytest.fixture(scope="module")
def server(ray_session, serve_index):
    """The service on 127.0.0.1 with a bearer token and a 1 MiB upload limit; every shard in the front."""
    from ctsearch.serve.api import token_digest
    from ctsearch.serve.deploy import ServeOptions, start, stop

    opts = ServeOptions(
        str(serve_index),
        port=free_port(),
        token_sha256=token_digest(TOKEN),
        max_upload_mb=1,
        cpus_per_replica=0.5,
    )
    base = start(opts).rstrip("/")
    yield base
    stop()


@pytest.fixture(scope="module")
def catalogue(server):
    return get_json(server, "/api/patients")


def first_exam(catalogue, patient: int = 0, exam: int = 0) -> dict:
    return catalogue[patient]["exams"][exam]


def test_health_info_and_catalogue(server, catalogue, serve_index):
    assert get_json(server, "/api/health") == {"status": "ok"}
    info = get_json(server, "/api/info")
    assert info["slices"] == json.loads((serve_index / "index.json").read_text())["rows"]
    assert (info["embedding_dim"], info["backbone"], info["volumes"], info["patients"]) == (128, "tiny", 6, 3)
    assert [s["name"] for s in info["shards"]] == ["shard-00000", "shard-00001", "shard-00002"]
    assert len(catalogue) == 3 and all(len(p["exams"]) == 2 for p in catalogue)
    e = first_exam(catalogue)
    vol = get_json(server, f"/api/volumes/{e['volume_id']}")
    assert [s["slice_index"] for s in vol["slices"]] == list(range(e["n_slices"]))
    assert np.all(np.diff([s["z_mm"] for s in vol["slices"]]) > 0)  # slice 0 is the most inferior


def test_search_by_row_equals_index_search_and_names_the_dicom_file(server, catalogue, serve_index):
    import pydicom

    from ctsearch.index import Index
    from ctsearch.query import embed_query

    e = first_exam(catalogue)
    res = get_json(server, f"/api/search?query={e['volume_id']}:20&k=4")
    index = Index.open(serve_index)
    v, _ = embed_query(index, f"{e['volume_id']}:20")
    expect = index.search(v, k=4).hits[0]
    keys = ("rank", "score", "volume_id", "patient_id", "slice_index", "z_mm", "path", "shard", "row")
    assert [{k: h[k] for k in keys} for h in res["hits"]] == [{k: h[k] for k in keys} for h in expect]
    assert res["query"]["slice_index"] == 20 and res["query"]["patient_id"] == e["patient_id"]
    # The SOPInstanceUID names the file of that very slice: its position is the hit's z.
    for hit in res["hits"]:
        assert hit["format"] == "dicom" and hit["sop_instance_uid"]
        files = [pydicom.dcmread(f, stop_before_pixels=True) for f in Path(hit["path"]).iterdir()]
        (ds,) = [d for d in files if d.SOPInstanceUID == hit["sop_instance_uid"]]
        assert float(ds.ImagePositionPatient[2]) == pytest.approx(hit["z_mm"], abs=1e-3)


def test_filters_patient_exclude_and_one_per_series(server, catalogue):
    e = first_exam(catalogue)
    own = e["patient_id"]
    q = f"/api/search?query={e['volume_id']}:30&k=6"
    assert {h["patient_id"] for h in get_json(server, q + f"&patient={own}")["hits"]} == {own}
    other = get_json(server, q + f"&exclude_patient={own}")["hits"]
    assert len(other) == 6 and own not in {h["patient_id"] for h in other}
    per_series = get_json(server, q + "&one_per=series")["hits"]
    assert len(per_series) == 6 and len({h["series_id"] for h in per_series}) == 6
    assert [h["rank"] for h in per_series] == list(range(1, 7))
    per_study = get_json(server, q + f"&one_per=study&exclude_patient={own}")["hits"]
    assert len(per_study) == 4 and len({h["study_id"] for h in per_study}) == 4  # 2 other patients x 2 exams


def test_cross_exam_finds_the_same_level_in_the_other_exam(server, catalogue):
    e, other = first_exam(catalogue, 0, 0), first_exam(catalogue, 0, 1)
    res = get_json(server, f"/api/crossexam?query={e['volume_id']}:32&per_exam=3")
    assert [x["volume_id"] for x in res["exams"]] == [other["volume_id"]]
    matches = res["exams"][0]["matches"]
    assert len(matches) == 3 and [m["z_mm"] for m in matches] == sorted(m["z_mm"] for m in matches)


def test_thumbnails_in_each_window(server, catalogue):
    from PIL import Image

    e = first_exam(catalogue)
    pictures = {}
    for window in ("wide", "narrow", "liver", "40,400"):
        status, headers, body = call(
            server, f"/api/thumbnail?volume_id={e['volume_id']}&slice=30&window={window}&size=128"
        )
        assert status == 200 and headers["content-type"] == "image/png"
        img = Image.open(io.BytesIO(body))
        assert img.size == (128, 128)
        pictures[window] = np.asarray(img)
    assert np.array_equal(pictures["narrow"], pictures["liver"])
    assert not np.array_equal(pictures["wide"], pictures["liver"])


def test_explain_pair_is_a_png_of_overlays(server, catalogue):
    from PIL import Image

    e = first_exam(catalogue)
    hit = get_json(server, f"/api/search?query={e['volume_id']}:30&k=2&exclude_patient={e['patient_id']}")[
        "hits"
    ][0]
    status, headers, body = call(
        server, f"/api/explain?query={e['volume_id']}:30&hit={hit['volume_id']}:{hit['slice_index']}&masks=40"
    )
    assert status == 200 and headers["content-type"] == "image/png"
    w, h = Image.open(io.BytesIO(body)).size
    assert w > 2 * 256 and h > 3 * 256  # 2 columns (query, hit) x 3 rows (slices, own maps, pair maps)


def test_upload_nifti_answers_like_search_of_the_file(server, serve_archive, serve_index):
    from ctsearch.index import Index
    from ctsearch.io import read_volume
    from ctsearch.query import embed_query

    nifti = sorted((serve_archive / "nifti" / "imagesTr").glob("*.nii.gz"))[0]
    vol = read_volume(nifti)
    res = get_json(server, "/api/search?k=5&slice=25", data=nifti.read_bytes())
    q = res["query"]
    assert q["upload"] and q["slice_index"] == 25 and q["n_slices"] == vol.hu.shape[0] and q["path"] is None
    index = Index.open(serve_index)
    expect = index.search(embed_query(index, nifti, 25)[0], k=5).hits[0]  # `ctsearch search FILE --slice 25`
    assert [(h["volume_id"], h["slice_index"]) for h in res["hits"]] == [
        (h["volume_id"], h["slice_index"]) for h in expect
    ]
    assert [h["score"] for h in res["hits"]] == pytest.approx([h["score"] for h in expect], abs=1e-6)
    assert max(h["score"] for h in res["hits"]) == pytest.approx(1.0, abs=1e-5)  # its DICOM copy is indexed
    status, headers, body = call(server, "/api/thumbnail?slice=25&window=liver", data=nifti.read_bytes())
    assert status == 200 and headers["content-type"] == "image/png"
    mid = get_json(server, "/api/search?k=1", data=nifti.read_bytes())["query"]
    assert mid["slice_index"] == vol.hu.shape[0] // 2


def test_upload_zipped_dicom_series_and_cross_exam(server, catalogue):
    e = first_exam(catalogue)
    folder = Path(get_json(server, f"/api/search?query={e['volume_id']}:3&k=1")["hits"][0]["path"])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f"x/{f.name}")
    res = get_json(server, f"/api/search?k=3&slice=12&patient={e['patient_id']}", data=buf.getvalue())
    assert res["query"]["patient_id"] == e["patient_id"] and res["query"]["series_id"] == e["series_id"]
    assert res["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    cross = get_json(server, "/api/crossexam?slice=12", data=buf.getvalue())
    # The upload is the indexed series itself (same pixels): aligned, not offered as another exam.
    assert cross["copies_of_query"] == [e["volume_id"]]
    others = {x["volume_id"] for x in catalogue[0]["exams"]} - {e["volume_id"]}
    assert {x["volume_id"] for x in cross["exams"]} == others and cross["context_slices"] == e["n_slices"]


def test_bad_requests_get_one_line_4xx(server, catalogue):
    e = first_exam(catalogue)
    vid = e["volume_id"]
    cases = [
        ("/api/search?query=no-such-volume:3", 404, "unknown volume"),
        (f"/api/search?query={vid}:9999", 404, "not in the index"),
        (f"/api/search?query={vid}", 400, "volume_id:slice_index"),
        ("/api/search", 400, "missing query"),
        (f"/api/search?query={vid}:3&k=abc", 400, "k must be an integer"),
        (f"/api/search?query={vid}:3&k=0", 400, "k must be between"),
        (f"/api/search?query={vid}:3&one_per=patient", 400, "one_per"),
        (f"/api/thumbnail?volume_id={vid}&slice=3&window=bone", 400, "window"),
        (f"/api/thumbnail?volume_id={vid}&slice=999", 400, "out of range"),
        (f"/api/explain?query={vid}:3", 400, "hit="),
        ("/api/nothing-here", 404, ""),
    ]
    for path, status, words in cases:
        s, _, body = call(server, path)
        assert words in one_line_error(s, body, status), path
    assert "out of range" in one_line_error(
        *call(server, "/api/search?slice=999", data=_tiny_nifti())[::2], 400
    )
    err = one_line_error(*call(server, "/api/search", data=b"\x1f\x8b" + b"garbage" * 100)[::2], 400)
    assert err.startswith("upload:")
    err = one_line_error(*call(server, "/api/search", data=b"hello, this is not a scan" * 20)[::2], 400)
    assert "NIfTI" in err
    err = one_line_error(*call(server, "/api/search", data=b"\x1f\x8b" + bytes(1_100_000))[::2], 413)
    assert "limit" in err


def _tiny_nifti() -> bytes:
    import tempfile

    from ctsearch.io import Volume, write_nifti

    with tempfile.TemporaryDirectory() as d:
        vol = Volume(
            hu=np.zeros((3, 64, 64), np.int16),
            spacing_mm=(2.0, 1.0, 1.0),
            affine=Volume.affine_from((2.0, 1.0, 1.0), (0, 0, 0)),
        )
        write_nifti(vol, Path(d) / "t.nii.gz")
        return (Path(d) / "t.nii.gz").read_bytes()


def test_token_required_and_checked(server):
    for token in (None, "wrong-token-0123456789", ""):
        status, headers, body = call(server, "/api/health", token=token)
        assert "bearer token" in one_line_error(status, body, 401)
        assert headers.get("www-authenticate", headers.get("WWW-Authenticate", "")).startswith("Bearer")
    assert call(server, "/api/search?query=x:1", token=None)[0] == 401
    # The page itself holds no patient data: it loads, and asks for the token.
    status, headers, body = call(server, "/", token=None)
    assert (
        status == 200 and b'id="auth"' in body and "default-src 'self'" in headers["content-security-policy"]
    )


def test_no_identifying_dicom_field_in_answers_or_logs(server, ray_session, tmp_path):
    """An uploaded slice carrying a name and a birth date: neither shows up in the answer or any log."""
    import pydicom

    from ctsearch.io import Volume, write_dicom_series

    vol = Volume(
        hu=np.full((2, 64, 64), 40, np.int16),
        spacing_mm=(2.0, 1.0, 1.0),
        affine=Volume.affine_from((2.0, 1.0, 1.0), (0, 0, 0)),
        patient_id="PID-7",
        study_id="s",
        series_id="se",
    )
    f = write_dicom_series(vol, tmp_path)[0]
    ds = pydicom.dcmread(f)
    ds.PatientName, ds.PatientBirthDate = "Doe^Janet-Xq", "19411207"
    ds.save_as(f)
    body = Path(f).read_bytes()
    res = get_json(server, "/api/search?k=2", data=body)
    text = json.dumps(res)
    assert "Doe" not in text and "19411207" not in text and res["query"]["patient_id"] == "PID-7"
    call(server, "/api/search?k=2", data=body[:-5000])  # a broken copy: an error path too
    session = Path(ray_session._private.worker._global_node.get_session_dir_path())
    for log in (session / "logs").rglob("*"):
        if log.is_file():
            content = log.read_bytes()
            assert b"Janet-Xq" not in content and b"19411207" not in content, log


def test_static_page_loads_nothing_from_elsewhere():
    from importlib import resources

    for name in ("index.html", "app.js", "style.css"):
        text = resources.files("ctsearch.serve").joinpath("static", name).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name


# ----------------------------------------------------------------------------- the browser


def _browser_or_skip():
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
    )
    if not chromium or not driver:
        pytest.skip(
            "needs Debian's chromium and chromium-driver packages (apt-get install chromium chromium-driver; "
            "`make test` installs them when run as root)"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("needs the selenium package (pip install -e '.[test]')")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
    ):
        opts.add_argument(a)
    import tempfile

    profile = tempfile.mkdtemp(prefix="ctsearch-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    # The driver's path is given, so Selenium Manager never looks for (or downloads) one.
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts), profile


def test_page_in_headless_chromium(server, catalogue):
    import shutil

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser, profile = _browser_or_skip()
    from selenium.common.exceptions import StaleElementReferenceException

    # The page redraws its results as they arrive: an element read mid-redraw is retried, not a failure.
    wait = WebDriverWait(browser, 120, ignored_exceptions=(StaleElementReferenceException,))
    try:
        browser.get(server + "/")
        # A token is configured: the page asks for it.
        wait.until(lambda b: b.find_element(By.ID, "auth").is_displayed())
        browser.find_element(By.ID, "token").send_keys(TOKEN, Keys.ENTER)
        wait.until(lambda b: len(Select(b.find_element(By.ID, "patient")).options) == 3)
        Select(browser.find_element(By.ID, "patient")).select_by_index(1)
        wait.until(lambda b: len(Select(b.find_element(By.ID, "exam")).options) == 2)
        Select(browser.find_element(By.ID, "exam")).select_by_index(1)
        k = browser.find_element(By.ID, "k")
        k.clear()
        k.send_keys("3")
        slider = browser.find_element(By.ID, "slice")
        for _ in range(4):
            slider.send_keys(Keys.ARROW_RIGHT)
        browser.find_element(By.ID, "search").click()

        def loaded(selector):
            return lambda b: (
                all(
                    b.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
                    for i in b.find_elements(By.CSS_SELECTOR, selector)
                )
                and b.find_elements(By.CSS_SELECTOR, selector)
            )

        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results .hit")) == 3)
        wait.until(loaded("#results .hit img"))
        wait.until(loaded("#query-image"))
        label = browser.find_element(By.ID, "slice-label").text
        assert "slice" in label and "z" in label
        # The hits' texts read in one go, again if the list is redrawn meanwhile (stale elements).
        texts = wait.until(lambda b: [h.text for h in b.find_elements(By.CSS_SELECTOR, "#results .hit")])
        own = catalogue[1]["patient_id"]
        assert len(texts) == 3
        assert all(own not in t for t in texts)  # "other patients only" is on by default
        assert all("z " in t and "patient" in t for t in texts)
        # Cross-exam: the patient's other exam, aligned along z.
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#crossexam .exam"))
        # Switch the window: every picture is redrawn.
        before = browser.find_element(By.ID, "query-image").get_attribute("src")
        browser.find_element(By.ID, "window-liver").click()
        wait.until(lambda b: b.find_element(By.ID, "query-image").get_attribute("src") != before)
        wait.until(loaded("#results .hit img"))
        # The first hit's RELAX explanation.
        wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#results .hit button.explain").click() or True)
        wait.until(lambda b: b.find_element(By.ID, "explain-dialog").is_displayed())
        wait.until(loaded("#explain-image"))
        assert "computing" not in browser.find_element(By.ID, "explain-status").text
        assert not browser.find_element(By.ID, "message").is_displayed()
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


# ----------------------------------------------------------------------------- sharded deployment


def test_sharded_deployment_returns_exactly_the_single_process_results(server, catalogue, serve_index):
    """Shards spread over 2 group deployments ([0, 1], [2]); the front's merge equals Index.search hit for hit."""
    from ctsearch.crossexam import cross_exam
    from ctsearch.index import Index
    from ctsearch.query import embed_query
    from ctsearch.serve.api import token_digest
    from ctsearch.serve.deploy import ServeOptions, start

    port = int(server.rsplit(":", 1)[1])
    # The same app name: Serve replaces the single-process front by the sharded application.
    start(
        ServeOptions(
            str(serve_index),
            port=port,
            token_sha256=token_digest(TOKEN),
            shards_per_replica=2,
            cpus_per_replica=0.5,
        )
    )
    info = get_json(server, "/api/info")
    assert info["shard_groups"] == 2
    index = Index.open(serve_index)
    keys = (*HIT_COLUMNS, "shard", "row")
    for p, e in ((0, 0), (1, 1), (2, 0)):
        ex = first_exam(catalogue, p, e)
        ref = f"{ex['volume_id']}:{10 + 11 * p}"
        v, meta = embed_query(index, ref)
        for params, kw in (
            ("", {}),
            (f"&exclude_patient={ex['patient_id']}", {"exclude_patient": ex["patient_id"]}),
            (f"&patient={ex['patient_id']}", {"patient": ex["patient_id"]}),
        ):
            got = get_json(server, f"/api/search?query={ref}&k=7{params}")["hits"]
            expect = index.search(v, k=7, **kw).hits[0]
            assert [{k: h[k] for k in keys} for h in got] == [{k: h[k] for k in keys} for h in expect]
        got = get_json(server, f"/api/crossexam?query={ref}&per_exam=4")["exams"]
        assert got == json.loads(
            json.dumps(
                cross_exam(
                    index,
                    v,
                    meta["patient_id"],
                    exclude_volume=ex["volume_id"],
                    per_exam=4,
                    query_slice=10 + 11 * p,
                )["exams"]
            )
        )
    s, _, body = call(server, "/api/search?query=nope:1")
    assert "unknown volume" in one_line_error(s, body, 404)
