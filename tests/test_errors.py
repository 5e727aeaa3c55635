"""The error catalogue: distinct exit codes, and errors that survive the control socket as their class."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from bdserver import errors
from bdserver.daemon.protocol import call, encode, error_reply, read_line


def _leaves() -> list[type[errors.BdError]]:
    return [c for c in vars(errors).values()
            if isinstance(c, type) and issubclass(c, errors.BdError) and c is not errors.BdError]


def test_every_error_lives_in_the_catalogue_with_a_documented_exit_code() -> None:
    import bdserver.cli  # noqa: F401  (imports every module a CLI command can raise from)
    import bdserver.daemon.server  # noqa: F401

    for name in list(errors._REGISTRY):
        cls = errors.error_class(name)
        assert cls is not None and cls.__module__ == "bdserver.errors", f"{name} is defined outside errors.py"
    for cls in _leaves():
        assert cls.exit_code in errors.EXIT_CODES, cls
    # a code names one family: subclasses share their parent's code, unrelated classes never do
    by_code: dict[int, set[type]] = {}
    for cls in _leaves():
        root = next(b for b in reversed(cls.__mro__) if isinstance(b, type) and issubclass(b, errors.BdError)
                    and b is not errors.BdError and b.exit_code == cls.exit_code)
        by_code.setdefault(cls.exit_code, set()).add(root)
    assert {code: len(roots) for code, roots in by_code.items() if len(roots) > 1} == {}


@pytest.mark.parametrize("cls", [errors.NoSuchDevice, errors.DeviceBusy, errors.FetchError, errors.PolicyError])
def test_an_error_raised_in_the_daemon_is_the_same_class_in_the_client(cls: type, tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def answer() -> None:
        conn, _ = srv.accept()
        with conn:
            json.loads(read_line(conn))
            exc = cls("it went wrong")
            exc.hint = "a hint from the daemon"
            conn.sendall(encode(error_reply(exc)))

    t = threading.Thread(target=answer)
    t.start()
    with pytest.raises(cls) as ei:
        call(path, "anything")
    t.join()
    srv.close()
    assert str(ei.value) == "it went wrong" and ei.value.hint == "a hint from the daemon"
    assert ei.value.exit_code == cls.exit_code


def test_a_non_bdserver_exception_crosses_as_a_daemon_error() -> None:
    err = error_reply(RuntimeError("boom"))["error"]
    exc = errors.from_wire(err)
    assert type(exc) is errors.DaemonError and "boom" in str(exc)


def test_the_readme_table_is_the_catalogue() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for code, meaning in errors.EXIT_CODES.items():
        assert f"| {code} | {meaning} |" in readme
