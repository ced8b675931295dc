"""A fake CloudStack API server that speaks the real wire protocol, for the volume backend's tests.

It verifies request signatures the way CloudStack's ApiServer does (parameters sorted by name,
values URL-encoded, the whole string lower-cased, HMAC-SHA1 with the secret key, base64; and the
``expires`` deadline of signatureVersion 3), runs createVolume/attachVolume/detachVolume as async
jobs that stay pending for a number of polls, and models volume states. Faults can be injected.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlparse

ASYNC = {"createVolume", "attachVolume", "detachVolume", "createTags", "resizeVolume"}


def cloudstack_signature(params: dict[str, str], secret: str) -> str:
    unsigned = "&".join(f"{k}={quote(v, safe='.-*_')}" for k, v in sorted(params.items()) if k != "signature")
    digest = hmac.new(secret.encode(), unsigned.lower().encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


class FakeCloudStack:
    def __init__(
        self,
        device_root: Path,
        key: str = "test-api-key",
        secret: str = "test-secret-key",
        data_dir: Path | None = None,
    ) -> None:
        self.key, self.secret = key, secret
        self.device_root = device_root
        # Volumes are real sparse files here; an attached volume's by-id link points at its file.
        self.data_dir = data_dir or device_root.parent / "cloudstack-volumes"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.zone_id = str(uuid.uuid4())
        self.offering_id = str(uuid.uuid4())
        self.oma_vm_id = str(uuid.uuid4())
        self.volumes: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.requests: list[str] = []
        self.pending_polls = 2  # polls answered "pending" before a job finishes
        self.job_seconds: dict[str, float] = {}  # command -> at least this long before its job finishes
        self.job_failures: dict[str, tuple[int, str]] = {}  # command -> async failure (530, 533, ...)
        self.sync_failures: dict[str, tuple[int, str]] = {}  # command -> immediate error (431, ...)
        self.stall = False  # jobs never finish
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/client/api"

    def start(self) -> FakeCloudStack:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- the API -------------------------------------------------------------------------

    def handle(self, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        command = params.get("command", "")
        key = command.lower() + "response"
        if params.get("apiKey") != self.key or not hmac.compare_digest(
            params.get("signature", ""), cloudstack_signature(params, self.secret)
        ):
            return 401, {
                key: {"errorcode": 401, "errortext": "unable to verify user credentials and/or request signature"}
            }
        if params.get("signatureVersion") == "3":
            expires = dt.datetime.strptime(params.get("expires", ""), "%Y-%m-%dT%H:%M:%S%z")
            if expires < dt.datetime.now(dt.UTC):
                return 401, {key: {"errorcode": 401, "errortext": "signature expired"}}
        with self.lock:
            self.requests.append(command)
            if command in self.sync_failures:
                code, text = self.sync_failures.pop(command)
                return code, {key: {"errorcode": code, "errortext": text}}
            handler = getattr(self, f"api_{command}", None)
            if handler is None:
                return 432, {key: {"errorcode": 432, "errortext": f"The given command {command} does not exist"}}
            return handler(params, key)

    def _job(self, command: str, work: Any, undo: Any = None) -> str:
        job_id = str(uuid.uuid4())
        self.jobs[job_id] = {"command": command, "work": work, "undo": undo, "polls": 0, "started": time.monotonic()}
        return job_id

    def api_queryAsyncJobResult(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        job = self.jobs.get(params.get("jobid", ""))
        if job is None:
            return 431, {key: {"errorcode": 431, "errortext": "no such job"}}
        job["polls"] += 1
        body: dict[str, Any] = {"jobid": params["jobid"], "jobstatus": 0, "jobresultcode": 0}
        slow = time.monotonic() - job["started"] < self.job_seconds.get(job["command"], 0)
        if self.stall or job["polls"] <= self.pending_polls or slow:
            return 200, {key: body}
        if "result" not in job:
            failure = self.job_failures.pop(job["command"], None)
            if failure:
                job["result"] = (2, failure[0], {"errorcode": failure[0], "errortext": failure[1]})
                if job["undo"] is not None:
                    job["undo"]()
            else:
                try:
                    job["result"] = (1, 0, job["work"]())
                except ValueError as exc:  # the cloud refused the work itself: the job fails
                    job["result"] = (2, 530, {"errorcode": 530, "errortext": str(exc)})
        status, code, result = job["result"]
        body.update(jobstatus=status, jobresultcode=code, jobresulttype="object", jobresult=result)
        return 200, {key: body}

    def finish_jobs(self) -> None:
        """The cloud finishes every job still pending, as it does after a caller gave up waiting."""
        with self.lock:
            for job in self.jobs.values():
                if "result" not in job:
                    job["result"] = (1, 0, job["work"]())

    def api_listVolumes(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        wanted = {
            params[f"tags[{i}].key"]: params.get(f"tags[{i}].value", "")
            for i in range(10)
            if f"tags[{i}].key" in params
        }
        found = [
            v
            for v in self.volumes.values()
            if params.get("id", v["id"]) == v["id"]
            and params.get("name", v["name"]) == v["name"]
            and params.get("type", v["type"]) == v["type"]
            and all(
                {"key": k, "value": val} in [{"key": t["key"], "value": t["value"]} for t in v["tags"]]
                for k, val in wanted.items()
            )
        ]
        page, size = int(params.get("page", 1)), int(params.get("pagesize", 500))
        found = found[(page - 1) * size : page * size]
        return 200, {key: {"count": len(found), "volume": found} if found else {}}

    def api_createVolume(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        if params.get("zoneid") != self.zone_id or params.get("diskofferingid") != self.offering_id:
            return 431, {key: {"errorcode": 431, "errortext": "Unable to find zone or disk offering"}}
        volume_id = str(uuid.uuid4())
        size = int(params["size"]) << 30
        # CloudStack records the volume when it accepts the call (listVolumes shows it at once); its job
        # then allocates it. A job that fails takes the record away again.
        volume: dict[str, Any] = {
            "id": volume_id,
            "name": params["name"],
            "size": size,
            "state": "Creating",
            "type": "DATADISK",
            "tags": [],
        }
        self.volumes[volume_id] = volume
        with open(self.file_of(volume_id), "wb") as fh:
            fh.truncate(size)

        def work() -> dict[str, Any]:
            volume["state"] = "Allocated"
            return {"volume": dict(volume)}

        def undo() -> None:
            self.volumes.pop(volume_id, None)
            self.file_of(volume_id).unlink(missing_ok=True)

        return 200, {key: {"id": volume_id, "jobid": self._job("createVolume", work, undo)}}

    def api_attachVolume(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        volume = self.volumes.get(params.get("id", ""))
        if volume is None or volume.get("virtualmachineid"):
            return 431, {key: {"errorcode": 431, "errortext": "volume not found or already attached"}}

        def work() -> dict[str, Any]:
            volume.update(virtualmachineid=params["virtualmachineid"], state="Ready", deviceid=len(self.volumes))
            # What KVM does on hot-plug: the by-id link appears.
            self.device_of(volume["id"]).symlink_to(self.file_of(volume["id"]))
            return {"volume": dict(volume)}

        return 200, {key: {"jobid": self._job("attachVolume", work)}}

    def api_detachVolume(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        volume = self.volumes.get(params.get("id", ""))
        if volume is None or not volume.get("virtualmachineid"):
            return 431, {key: {"errorcode": 431, "errortext": "volume is not attached"}}

        def work() -> dict[str, Any]:
            volume.pop("virtualmachineid", None)
            volume.pop("deviceid", None)
            self.device_of(volume["id"]).unlink(missing_ok=True)
            return {"volume": dict(volume)}

        return 200, {key: {"jobid": self._job("detachVolume", work)}}

    def api_resizeVolume(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        volume = self.volumes.get(params.get("id", ""))
        if volume is None:
            return 431, {key: {"errorcode": 431, "errortext": "Unable to find volume"}}
        size = int(params.get("size", 0)) << 30
        if size < volume["size"] and params.get("shrinkok") != "true":
            return 431, {key: {"errorcode": 431, "errortext": "Going from existing size to new size is shrinking"}}

        def work() -> dict[str, Any]:
            volume["size"] = size
            with open(self.file_of(volume["id"]), "r+b") as fh:
                fh.truncate(size)
            return {"volume": dict(volume)}

        return 200, {key: {"jobid": self._job("resizeVolume", work)}}

    def api_createTags(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        if params.get("resourcetype") != "Volume":
            return 431, {key: {"errorcode": 431, "errortext": "only Volume tags are modelled"}}
        volumes = [self.volumes.get(rid) for rid in params.get("resourceids", "").split(",")]
        if not volumes or None in volumes:
            return 431, {key: {"errorcode": 431, "errortext": "Unable to find resource by id"}}
        tags = [
            {"key": params[f"tags[{i}].key"], "value": params.get(f"tags[{i}].value", "")}
            for i in range(10)
            if f"tags[{i}].key" in params
        ]

        def work() -> dict[str, Any]:
            for volume in volumes:
                assert volume is not None
                for tag in tags:
                    if any(t["key"] == tag["key"] for t in volume["tags"]):
                        raise ValueError(f"tag {tag['key']} already exists")  # CloudStack refuses a second one
                    volume["tags"].append({**tag, "resourcetype": "Volume", "resourceid": volume["id"]})
            return {"success": True}

        return 200, {key: {"jobid": self._job("createTags", work)}}

    def add_foreign_volume(self, name: str, owner: str | None = None, attached_to: str | None = None) -> str:
        """Another tenant's volume (or an untagged one) in the same account and zone."""
        volume_id = str(uuid.uuid4())
        tags = (
            [{"key": "oma-owner", "value": owner, "resourcetype": "Volume", "resourceid": volume_id}] if owner else []
        )
        volume: dict[str, Any] = {
            "id": volume_id,
            "name": name,
            "size": 1 << 30,
            "state": "Ready",
            "type": "DATADISK",
            "tags": tags,
        }
        if attached_to:
            volume["virtualmachineid"] = attached_to
        with self.lock:
            self.volumes[volume_id] = volume
        return volume_id

    def api_deleteVolume(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        volume = self.volumes.get(params.get("id", ""))
        if volume is None:
            return 431, {key: {"errorcode": 431, "errortext": "Unable to find volume"}}
        if volume.get("virtualmachineid"):
            return 431, {key: {"errorcode": 431, "errortext": "Please specify a volume that is not attached to any VM"}}
        del self.volumes[volume["id"]]
        self.file_of(volume["id"]).unlink(missing_ok=True)
        return 200, {key: {"success": "true"}}

    def file_of(self, volume_id: str) -> Path:
        return self.data_dir / f"{volume_id}.img"

    def device_of(self, volume_id: str) -> Path:
        return self.device_root / f"virtio-{volume_id.replace('-', '')[:20]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, params: dict[str, str]) -> None:
                status, body = fake.handle(params)
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                self._answer(dict(parse_qsl(urlparse(self.path).query, keep_blank_values=True)))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                self._answer(dict(parse_qsl(self.rfile.read(length).decode(), keep_blank_values=True)))

            def log_message(self, *args: object) -> None:
                pass

        return Handler
