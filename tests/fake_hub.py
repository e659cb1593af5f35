"""A fake Hugging Face hub on 127.0.0.1, for `mgpu push` tests: the edge this machine cannot reach.

It answers the requests huggingface_hub (1.x) makes for `create_repo`, `create_branch` and `create_commit`: repo
creation, README metadata validation, preupload (every file "regular", so its bytes travel inline in the commit)
and the commit itself (NDJSON). What arrives is kept per repo and branch, so a test compares it with the files on
disk. A request without the expected token gets 401, as the hub answers.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = "hf_fake_token_for_tests_0123456789"


class FakeHub:
    def __init__(self, fail_commits: int = 0):
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, headers)
        self.fail_commits = fail_commits  # answer this many commits with 500 (a server fault)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # repo_info, asked after a refused create_repo: the repo is not there
                hub.requests.append(("GET", self.path, dict(self.headers)))
                ok = self.headers.get("Authorization") == f"Bearer {TOKEN}"
                return self._send(404 if ok else 401, {"error": "Repository not found"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append(("POST", self.path, dict(self.headers)))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._send(401, {"error": "Invalid credentials in Authorization header"})
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo = f"{req.get('organization') or 'me'}/{req['name']}"
                    if repo in hub.repos:
                        url = f"{hub.url}/{repo}"
                        return self._send(409, {"error": "You already created this model repo", "url": url})
                    hub.repos[repo] = {"private": req.get("visibility") == "private", "branches": {"main": {}}}
                    return self._send(200, {"url": f"{hub.url}/{repo}", "name": repo})
                if path == "/api/validate-yaml":
                    return self._send(200, {})
                parts = path.split("/")  # /api/models/NS/NAME/(preupload|commit|branch)/REV
                if len(parts) >= 7 and parts[:3] == ["", "api", "models"]:
                    repo, action, rev = f"{parts[3]}/{parts[4]}", parts[5], "/".join(parts[6:])
                    if repo not in hub.repos:
                        return self._send(404, {"error": "Repository not found"})
                    branches = hub.repos[repo]["branches"]
                    if action == "branch":
                        branches.setdefault(rev, dict(branches["main"]))
                        return self._send(200, {})
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                        return self._send(200, {"files": answer, "commitOid": "0" * 40})
                    if action == "commit":
                        if hub.fail_commits:
                            hub.fail_commits -= 1
                            return self._send(500, {"error": "Internal Error"})
                        files = {}
                        for line in body.decode().splitlines():
                            item = json.loads(line)
                            if item["key"] == "file":
                                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        branches.setdefault(rev, {}).update(files)
                        url = f"{hub.url}/{repo}/commit/{'1' * 40}"
                        return self._send(200, {"commitUrl": url, "commitOid": "1" * 40, "pullRequestUrl": None})
                return self._send(404, {"error": f"no such endpoint: {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
