"""Transports: move wire messages between ranks (ZeroMQ or MPI)."""
from .base import Transport
from .wire import Message

__all__ = ["Transport", "Message"]
