"""``python -m tests.gcs_emulator PORT BUCKET``: gcp-storage-emulator, plus the two GCS behaviours of
media downloads that TensorStore's OCDBT (Orbax's checkpoint format) relies on and the emulator lacks.

Real GCS answers ``GET ...?alt=media`` with an ``x-goog-generation`` header and honours
``ifGenerationNotMatch`` (304) / ``ifGenerationMatch`` (412) on it; TensorStore re-reads an OCDBT
manifest with ``ifGenerationNotMatch=<cached generation>`` and, without the header, fails with
"Malformed StorageGeneration". It also answers ``moveTo`` (GCS's rename within a bucket), which
gcsfs tries first on every rename: the emulator's 501 made gcsfs retry with backoff for ~30 s before
falling back to copy + delete. Everything else is the emulator as installed, except that it is served
threaded: the emulator's own server is single-threaded, so one client that opens a connection and
stalls before sending (seen: a train process blocked writing its stderr) held every other client.
"""
import re
import sys
import threading
from functools import partial
from http import HTTPStatus
from http.server import ThreadingHTTPServer

from gcp_storage_emulator import server, settings
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import buckets, objects
from gcp_storage_emulator.storage import Storage

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
        return _download(request, response, storage, *args, **kwargs)
    generation = str(obj["generation"])
    response["x-goog-generation"] = generation
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    query = request.query
    if query.get("ifGenerationNotMatch", [None])[0] == generation:
        response.status = HTTPStatus.NOT_MODIFIED
        return None
    match = query.get("ifGenerationMatch", [None])[0]
    if match is not None and match != generation:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return None
    return _download(request, response, storage, *args, **kwargs)


def move(request, response, storage, *args, **kwargs):
    """``POST .../b/BUCKET/o/SOURCE/moveTo/o/DESTINATION``: the object renamed, its new resource returned."""
    bucket, source, destination = (request.params[k] for k in ("bucket_name", "object_id", "dest_object_id"))
    try:
        moved = objects._copy(request.base_url, storage, bucket, source, bucket, destination)
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return None
    objects._delete(storage, bucket, source)
    response.json(moved)
    return None


_MOVE_ROUTE = (
    rf"^{re.escape(settings.API_ENDPOINT)}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$",
    {server.POST: move},
)
_lock = threading.Lock()  # the emulator's in-memory storage is not thread-safe


def _serialized(handler):
    def locked(request, response, storage, *args, **kwargs):
        request.data  # reads the request body (if any) outside the lock
        with _lock:
            return handler(request, response, storage, *args, **kwargs)
    return locked


objects.download = download  # objects.get (alt=media) calls it by name
server.HANDLERS = tuple(
    (regex, {method: _serialized(download if handler is _download else handler)
             for method, handler in handlers.items()})
    for regex, handlers in (_MOVE_ROUTE, *server.HANDLERS)  # moveTo before the generic object path
)


class _Handler(server.RequestHandler):
    timeout = 60  # seconds a connection may sit idle mid-request before it is dropped


if __name__ == "__main__":
    port, bucket = int(sys.argv[1]), sys.argv[2]
    storage = Storage(use_memory_fs=True)
    buckets.create_bucket(bucket, storage)
    ThreadingHTTPServer(("127.0.0.1", port), partial(_Handler, storage)).serve_forever()  # daemon threads
