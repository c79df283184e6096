"""Collectives over a transport: ring all-reduce, all-gather, broadcast, barrier."""
from .communicator import Communicator

__all__ = ["Communicator"]
