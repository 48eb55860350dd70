"""GET /qwenclip/status: which library was taken (loading it if needed), its version and
capabilities, and the memory held by live encoders and trainers. For people and tests."""

from aiohttp import web
from server import PromptServer

from . import encoder, library


def status() -> dict:
    out = {
        "library": None,
        "version": None,
        "cuda": None,
        "memory": None,
        "error": None,
        "live_encoders": len(encoder.live_bases()),
    }
    try:
        lib = library.get()
        out.update(library=str(lib.path), version=lib.version, cuda=lib.has_cuda, memory=lib.memory())
    except Exception as e:
        out["error"] = str(e)
    return out


@PromptServer.instance.routes.get("/qwenclip/status")
async def _status(request):
    return web.json_response(status())
