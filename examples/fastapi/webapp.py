"""
A small FastAPI application: a JSON route, a streaming response and a
WebSocket echo, with a lifespan that logs its startup and shutdown.
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from twisted.logger import Logger

log = Logger(namespace="webapp")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, str]]:
    log.info("webapp lifespan startup")
    yield {"greeting": "hello"}
    log.info("webapp lifespan shutdown")


app = FastAPI(lifespan=lifespan)


@app.get("/hello/{name}")
async def hello(name: str) -> dict[str, str]:
    return {"message": f"hello {name}"}


@app.get("/count")
async def count(to: int = 5) -> StreamingResponse:
    async def numbers() -> AsyncIterator[str]:
        for i in range(1, to + 1):
            yield f"{i}\n"
            await asyncio.sleep(0.01)

    return StreamingResponse(numbers(), media_type="text/plain")


@app.websocket("/echo")
async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text("echo: " + await websocket.receive_text())
    except WebSocketDisconnect:
        pass
