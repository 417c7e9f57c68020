"""The OpenAPI document: served as kept in the repo, valid OpenAPI 3.1, and true of the live
service according to schemathesis (no 5xx, every response as documented, every input the
document forbids refused)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from service import REPO_ROOT, TIMEOUT, Productd, raw_request

DOCUMENT = REPO_ROOT / "productd" / "http" / "openapi.json"
MAX_EVENTS = 20  # small, so that generated batches also meet the 413 limit
SEED = 20261121
MAX_EXAMPLES = 50
RUN_DEADLINE = 240  # seconds; only so that a hang fails (the run itself takes well under a minute)

# The NDJSON media types carry an EventBatch in the document; on the wire each item is one line.
HOOKS = '''
import json

import schemathesis


@schemathesis.serializer("application/x-ndjson", "application/ndjson", "application/jsonl")
def ndjson(ctx, value):
    if isinstance(value, list):
        return b"".join(json.dumps(item).encode() + b"\\n" for item in value)
    if isinstance(value, dict):
        # Not an array: a single object would read as a valid one-line batch, so keep it
        # non-conforming on the wire too (a line that is an array, which no event is).
        return json.dumps([value]).encode() + b"\\n"
    return json.dumps(value).encode() + b"\\n"
'''

CONFIG = """
[checks.negative_data_rejection]
# invalid input may also be refused as too large (413) or as an unsupported media type (415)
expected-statuses = ["400", "401", "404", "405", "413", "415", "422"]
"""


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    svc = Productd(tmp_path_factory.mktemp("openapi"), shards=2, workers=2,
                   extra_args=["--max-events", str(MAX_EVENTS)])
    svc.start()
    try:
        yield svc
        assert svc.stop() == 0, svc.log_tail()
    finally:
        svc.kill()


def test_served_document_is_the_repo_file_with_max_events(api):
    r = requests.get(api.url + "/openapi.json", timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.headers["Content-Type"].split(";")[0] == "application/json"
    served = r.json()
    kept = json.loads(DOCUMENT.read_text())
    assert kept["components"]["schemas"]["EventBatch"]["maxItems"] == 10000  # the default --max-events
    assert served["components"]["schemas"]["EventBatch"]["maxItems"] == MAX_EVENTS
    kept["components"]["schemas"]["EventBatch"]["maxItems"] = MAX_EVENTS
    assert served == kept


def test_repo_document_is_valid_openapi_3_1():
    validator = pytest.importorskip("openapi_spec_validator")
    doc = json.loads(DOCUMENT.read_text())
    assert doc["openapi"].startswith("3.1.")
    validator.validate(doc)


def test_every_path_and_status_documented():
    doc = json.loads(DOCUMENT.read_text())
    assert set(doc["paths"]) == {"/events", "/products/{id}", "/healthz", "/readyz", "/metrics", "/openapi.json"}
    post = doc["paths"]["/events"]["post"]["responses"]
    assert {"202", "400", "401", "413", "415", "422", "503"} <= set(post)
    get = doc["paths"]["/products/{id}"]["get"]["responses"]
    assert {"200", "400", "401", "404", "503", "504"} <= set(get)


def _schemathesis() -> str:
    exe = Path(sys.executable).parent / "schemathesis"
    found = str(exe) if exe.exists() else shutil.which("schemathesis")
    if not found:
        pytest.fail("schemathesis is not installed (it is a test dependency, see tox.ini)")
    return found


def test_schemathesis_against_live_service(api, tmp_path):
    # The document as this instance serves it, run from a file: schemathesis leaves out the
    # operation that serves the schema when it loads the schema from that URL.
    served = requests.get(api.url + "/openapi.json", timeout=TIMEOUT).json()
    operations = sum(len(methods) for methods in served["paths"].values())
    (tmp_path / "openapi.json").write_text(json.dumps(served))
    (tmp_path / "productd_st_hooks.py").write_text(HOOKS)
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "productd_st_hooks", "PYTHONPATH": str(tmp_path)}
    cmd = [
        _schemathesis(), "--config-file", str(config), "--no-color",
        "run", str(tmp_path / "openapi.json"), "--url", api.url + "/",
        "--checks", "all",
        # stateful checks: this API has no links between operations to follow
        "--exclude-checks", "use_after_free,ensure_resource_availability",
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", str(SEED),
        "--generation-database", "none",
        "--workers", "2",
        "--request-timeout", "10",
        "--suppress-health-check", "all",
        "--max-failures", "20",
    ]
    try:
        run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_DEADLINE)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"schemathesis did not finish within {RUN_DEADLINE}s\n{exc.stdout}")
    report = run.stdout + run.stderr
    assert run.returncode == 0, f"schemathesis failed (exit {run.returncode}):\n{report[-15000:]}"
    # the run really exercised every operation of the document
    assert re.search(rf"Tested:\s+{operations}\b", report), report[-3000:]


def test_undeclared_methods_answer_405_with_allow(api):
    doc = json.loads(DOCUMENT.read_text())
    concrete = {"/products/{id}": "/products/abc123"}
    for path, operations in doc["paths"].items():
        declared = {m.upper() for m in operations}
        for method in ("PUT", "DELETE", "PATCH"):
            code, headers, data = raw_request(api.port, method, concrete.get(path, path))
            assert code == 405, (method, path, code, data[:300])
            assert headers["content-type"].startswith("application/problem+json"), (method, path)
            allowed = {m.strip() for m in headers["allow"].split(",")}
            assert declared <= allowed, (method, path, headers["allow"])
