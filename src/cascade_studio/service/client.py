"""A small Python client for the /v1 API.

from cascade_studio.service.client import CascadeClient
client = CascadeClient("http://127.0.0.1:7860")
images, seeds = client.generate("a red circle on a white background", num_images=2, seed=1)
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
from PIL import Image


class APIError(Exception):
    """A 4xx/5xx answer; `messages` holds the server's field-level messages."""

    def __init__(self, status: int, messages: list[str]):
        super().__init__(f"{status}: {'; '.join(messages)}")
        self.status, self.messages = status, messages


class CascadeClient:
    """The /v1 API from Python, with the server's messages raised as APIError.

    Args:
        base_url: where the server listens.
        token: the server's --api-token, sent as a Bearer token.
        timeout: seconds for each request (event streams have none).
    Raises (every method):
        APIError: a 4xx/5xx answer; `.status` and `.messages` say what the server said, field by field.
        httpx.HTTPError: the server could not be reached.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:7860", token: str | None = None, timeout: float = 60):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                messages = response.json().get("detail", [response.text])
            except ValueError:
                messages = [response.text]
            raise APIError(response.status_code, messages if isinstance(messages, list) else [str(messages)])
        return response

    def submit(self, prompt: str, **fields: Any) -> dict:
        """Queue a generation; returns at once with its id, seeds and queue position."""
        return self._check(self._http.post("/v1/generations", json={"prompt": prompt, **fields})).json()

    def status(self, job_id: str) -> dict:
        return self._check(self._http.get(f"/v1/generations/{job_id}")).json()

    def cancel(self, job_id: str) -> None:
        self._check(self._http.delete(f"/v1/generations/{job_id}"))

    def events(self, job_id: str) -> Iterator[tuple[str, dict]]:
        """(event, data) pairs from the server-sent event stream, until the job ends."""
        with self._http.stream("GET", f"/v1/generations/{job_id}/events", timeout=None) as response:
            self._check(response)
            name = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: ") and name:
                    yield name, json.loads(line.removeprefix("data: "))
                    name = None

    def wait(self, job_id: str) -> dict:
        """Follow the events to the end; the final state of the job."""
        for name, data in self.events(job_id):
            if name in ("done", "error", "cancelled"):
                return data
        return self.status(job_id)

    def image(self, image_id: str) -> Image.Image:
        return Image.open(io.BytesIO(self._check(self._http.get(f"/v1/images/{image_id}.png")).content))

    def generate(self, prompt: str, **fields: Any) -> tuple[list[Image.Image], list[int]]:
        """Submit, wait, download.

        Args:
            prompt: the text; `fields` are the other request fields (width, seed, num_images, ...).
        Returns:
            The images and their seeds (image i uses seed + i).
        Raises:
            APIError: a refused request (422 with the field's message, 429 when the queue is full), or a job that
                failed or was cancelled (status 500, with the job's error).
        """
        job = self.wait(self.submit(prompt, **fields)["id"])
        if job["status"] != "done":
            raise APIError(500, [job.get("error") or f"generation {job['status']}"])
        return [self.image(im["id"]) for im in job["images"]], job["seeds"]

    def history(self, limit: int = 20, offset: int = 0) -> dict:
        return self._check(self._http.get("/v1/history", params={"limit": limit, "offset": offset})).json()

    def health(self) -> dict:
        return self._check(self._http.get("/v1/health")).json()

    def close(self) -> None:
        self._http.close()
