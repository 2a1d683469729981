"""Named implementations a run config chooses by name: combine rules, server optimizers,
staleness functions and update compression methods are each a Registry, so a new one is one
registered function (plus its test), and the config's allowed values are the registry's names
(aggregation.choices). In the kernel, so that the node's compression methods register too."""

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from node_payload.common.errors import UserError

F = TypeVar("F", bound=Callable[..., object])


class Registry(Generic[F]):
    """name -> function; iterating gives the names, in the order they were registered."""

    def __init__(self, name: str, key: str) -> None:
        """name: what the config schema's `choices` calls it; key: the config key that picks
        one ("[server] rule"), for messages."""
        self.name = name
        self.key = key
        self._functions: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: add the function under `name`."""

        def add(function: F) -> F:
            if name in self._functions:
                raise ValueError(f"{self.key}: {name!r} is registered twice")
            self._functions[name] = function
            return function

        return add

    def __getitem__(self, name: str) -> F:
        try:
            return self._functions[name]
        except KeyError:
            raise UserError(
                f"{self.key} = {name!r} is not known; choose one of {', '.join(self)} "
                "(and plan the run again)"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._functions)
