"""Client of the VMA agent's HTTP JSON contract (docs/vma-api.md), on httpx."""

from __future__ import annotations

from typing import Any

import httpx


class VmaError(Exception):
    """The VMA answered with an error, or could not be reached; ``code`` is machine-readable."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"VMA {code}: {message}")
        self.code = code
        self.message = message
        self.status = status


class VmaUnavailable(VmaError):
    pass


class VmaClient:
    """Every call of the contract is idempotent, so connection failures are retried for all of them."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 10.0, retries: int = 3) -> None:
        self.http = httpx.Client(
            base_url=base_url.rstrip("/") + "/api/v1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            transport=httpx.HTTPTransport(retries=retries),
        )

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, path: str, json: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = self.http.request(method, path, json=json)
        except httpx.HTTPError as exc:
            raise VmaUnavailable("unreachable", f"{method} {path}: {exc}") from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400 or not isinstance(body, dict):
            error = body.get("error", {}) if isinstance(body, dict) else {}
            raise VmaError(
                str(error.get("code", f"http_{response.status_code}")),
                str(error.get("message", response.text[:300])),
                response.status_code,
            )
        return body

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    def inventory(self) -> list[dict[str, Any]]:
        vms: list[dict[str, Any]] = self._request("GET", "/inventory")["vms"]
        return vms

    def start_replication(self, replication_id: str, vm_id: str, disks: list[dict[str, Any]]) -> dict[str, Any]:
        payload = {"replication_id": replication_id, "vm_id": vm_id, "disks": disks}
        return self._request("POST", "/replications", json=payload)

    def replication(self, replication_id: str) -> dict[str, Any]:
        return self._request("GET", f"/replications/{replication_id}")

    def cancel(self, replication_id: str) -> dict[str, Any]:
        return self._request("POST", f"/replications/{replication_id}/cancel")
