"""A mirror file that serves a little, then cuts both connections: a host going down mid-read."""

import io
import socket

from pyftpdlib.handlers import FTPHandler


class DroppingFile(io.FileIO):
    """Serves one chunk of at most `first_chunk` bytes, then shuts the control and data sockets."""

    def __init__(self, path: str, handler: FTPHandler, first_chunk: int) -> None:
        super().__init__(path, "rb")
        self._handler = handler
        self._first_chunk = first_chunk
        self._served = False

    def read(self, size: int = -1) -> bytes:
        if not self._served:
            self._served = True
            return super().read(min(size, self._first_chunk))
        for channel in (self._handler, self._handler.data_channel):
            channel.socket.shutdown(socket.SHUT_RDWR)
        return b""
