"""Backend SPECs: every form builds its backend, every failure is a one-line BackendSpecError."""

from __future__ import annotations

import asyncio
import itertools
import textwrap

import pytest

from pacsys.aio import AsyncBackend
from pacsys.backends import Backend
from pacsys.backends.grpc_client import DAQClientBackend
from pacsys.backends.sim import SimBackend
from pacsys.backends.spec import BackendSpecError, build_backend, factory_spec
from pacsys.testing import FakeBackend
from workers.backend_spec import FactorySpecError, call_factory, parse_factory

_names = itertools.count()


def _close(backend: Backend | AsyncBackend) -> None:
    if isinstance(backend, AsyncBackend):
        asyncio.run(backend.close())
    else:
        backend.close()


def _spec_error(spec: str) -> str:
    """The message of the BackendSpecError that `spec` raises, checked for shape."""
    with pytest.raises(BackendSpecError) as info:
        build_backend(spec)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message
    assert repr(spec.strip()) in message
    return message


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    """A folder on sys.path; `write(source)` puts a uniquely named module there and returns its name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str, package: bool = False) -> str:
        name = f"specfactory_{next(_names)}"
        if package:
            pkg = tmp_path / name
            pkg.mkdir()
            (pkg / "__init__.py").write_text("")
            (pkg / "backends.py").write_text(textwrap.dedent(source))
        else:
            (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


# -- sim -------------------------------------------------------------------------------------


def test_sim_builds_the_default_simulator():
    backend = build_backend("sim")
    try:
        assert isinstance(backend, SimBackend)
        reading = asyncio.run(backend.get("M:OUTTMP@I"))
        assert reading.ok
    finally:
        _close(backend)


def test_sim_with_a_device_table(tmp_path):
    table = tmp_path / "devices.toml"
    table.write_text('[devices."Z:ONLYME"]\nbase = 5.0\n')
    backend = build_backend(f"sim:{table}")
    assert isinstance(backend, SimBackend)

    async def body():
        async with backend:
            return await backend.get_many(["Z:ONLYME@I", "M:OUTTMP@I"])

    mine, builtin = asyncio.run(body())
    assert mine.ok and mine.value == pytest.approx(5.0, abs=1.0)
    assert not builtin.ok  # the built-in table was not loaded


def test_sim_missing_table(tmp_path):
    message = _spec_error(f"sim:{tmp_path / 'nope.toml'}")
    assert "nope.toml" in message and "not a readable file" in message


def test_sim_empty_path():
    assert "no device table path" in _spec_error("sim:")


def test_sim_bad_table(tmp_path):
    table = tmp_path / "bad.toml"
    table.write_text("this is = = not toml\n[[[")
    message = _spec_error(f"sim:{table}")
    assert "cannot build the simulated backend" in message


# -- fake ------------------------------------------------------------------------------------


def test_fake_is_seeded():
    backend = build_backend("fake")
    try:
        assert isinstance(backend, FakeBackend)
        assert backend.read("M:OUTTMP") == pytest.approx(72.5)
        assert backend.read("G:AMANDA") == pytest.approx(42.0)
    finally:
        _close(backend)


# -- grpc ------------------------------------------------------------------------------------


def test_grpc_defaults():
    backend = build_backend("grpc://daq.example:50051")
    assert isinstance(backend, DAQClientBackend)
    assert backend.target == "daq.example:50051"
    assert backend.default_timeout == 5.0
    assert not backend.pass_caller_token
    assert backend._metadata() is None


def test_grpc_ipv6_host():
    backend = build_backend("grpc://[::1]:50051")
    assert isinstance(backend, DAQClientBackend)
    assert backend.target == "[::1]:50051"


def test_grpc_query(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    backend = build_backend(f"grpc://127.0.0.1:50051?token_file={token_file}&pass_token=1&timeout=2.5")
    assert isinstance(backend, DAQClientBackend)
    assert backend.pass_caller_token
    assert backend.default_timeout == 2.5
    assert backend._metadata() == (("authorization", "Bearer s3cret"),)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("grpc://127.0.0.1", "expected grpc://HOST:PORT"),
        ("grpc://:50051", "expected grpc://HOST:PORT"),
        ("grpc://127.0.0.1:http", "bad port"),
        ("grpc://127.0.0.1:99999", "bad port"),
        ("grpc://127.0.0.1:50051/path", "nothing after the port"),
        ("grpc://127.0.0.1:50051?tokenfile=x", "unknown query key 'tokenfile'"),
        ("grpc://127.0.0.1:50051?pass_token=maybe", "pass_token must be 1 or 0"),
        ("grpc://127.0.0.1:50051?timeout=soon", "timeout must be a positive number"),
        ("grpc://127.0.0.1:50051?timeout=0", "timeout must be a positive number"),
        ("grpc://127.0.0.1:50051?timeout=-1", "timeout must be a positive number"),
    ],
)
def test_grpc_errors(spec, expected):
    assert expected in _spec_error(spec)


def test_grpc_missing_token_file(tmp_path):
    message = _spec_error(f"grpc://127.0.0.1:50051?token_file={tmp_path / 'absent'}")
    assert "token_file" in message and "cannot read it" in message and "FileNotFoundError" in message


def test_grpc_empty_token_file(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("  \n")
    assert "is empty" in _spec_error(f"grpc://127.0.0.1:50051?token_file={token_file}")


# -- module:factory --------------------------------------------------------------------------


def test_factory_returning_a_sync_backend(module_dir):
    name = module_dir(
        """
        from pacsys.testing import FakeBackend

        def make():
            fb = FakeBackend()
            fb.set_reading("Z:MINE", 1.0)
            return fb
        """
    )
    backend = build_backend(f"{name}:make")
    assert isinstance(backend, FakeBackend) and backend.read("Z:MINE") == 1.0


def test_factory_in_a_package_returning_an_async_backend(module_dir):
    name = module_dir(
        """
        from pacsys.testing import AsyncFakeBackend

        class Factories:
            @staticmethod
            def make():
                return AsyncFakeBackend()
        """,
        package=True,
    )
    backend = build_backend(f"{name}.backends:Factories.make")
    assert isinstance(backend, AsyncBackend)
    _close(backend)


def test_factory_class_is_a_factory(module_dir):
    name = module_dir(
        """
        from pacsys.testing import FakeBackend as Backend
        """
    )
    assert isinstance(build_backend(f"{name}:Backend"), FakeBackend)


def test_factory_module_not_found():
    message = _spec_error("no_such_module_xyz:make")
    assert "cannot import module 'no_such_module_xyz'" in message
    assert "No module named 'no_such_module_xyz'" in message


def test_factory_module_raises_on_import(module_dir):
    name = module_dir("raise RuntimeError('boom\\nsecond line')\n")
    message = _spec_error(f"{name}:make")
    assert f"cannot import module {name!r}" in message and "RuntimeError: boom second line" in message


def test_factory_module_syntax_error(module_dir):
    name = module_dir("def broken(:\n")
    assert "SyntaxError" in _spec_error(f"{name}:make")


def test_factory_missing_attribute(module_dir):
    name = module_dir("x = 1\n")
    assert f"module {name!r} has no attribute 'make'" in _spec_error(f"{name}:make")


def test_factory_not_callable(module_dir):
    name = module_dir("make = 1\n")
    assert "is not callable" in _spec_error(f"{name}:make")


def test_factory_raises(module_dir):
    name = module_dir(
        """
        def make():
            raise ConnectionError("upstream refused")
        """
    )
    message = _spec_error(f"{name}:make")
    assert f"factory {name}:make() raised ConnectionError: upstream refused" in message


def test_factory_wrong_return_type(module_dir):
    name = module_dir(
        """
        def make():
            return {"not": "a backend"}
        """
    )
    message = _spec_error(f"{name}:make")
    assert "returned dict, not a pacsys Backend or AsyncBackend instance" in message


# -- unknown forms ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["", "nonsense", "http://host:1", "simulator", "a b:c", "mod:", ":make"])
def test_unknown_forms(spec):
    message = _spec_error(spec)
    assert "unknown form" in message and "grpc://HOST:PORT" in message


# -- factory arguments -----------------------------------------------------------------------


def test_factory_arguments_are_keywords_read_as_json_or_text(module_dir):
    name = module_dir(
        """
        from pacsys.testing import FakeBackend

        def make(**kwargs):
            fb = FakeBackend()
            fb.kwargs = kwargs
            return fb
        """
    )
    backend = build_backend(f"{name}:make?host=127.0.0.1&port=50051&tls=false&label=%22007%22&names=[1,2]&empty=")
    assert backend.kwargs == {
        "host": "127.0.0.1",
        "port": 50051,
        "tls": False,
        "label": "007",
        "names": [1, 2],
        "empty": "",
    }


@pytest.mark.parametrize(
    ("args", "fragment"),
    [("port", "key=value"), ("a=1&a=2", "given twice"), ("1x=2", "not a Python identifier")],
)
def test_bad_factory_arguments(args, fragment):
    message = _spec_error(f"mod:make?{args}")
    assert fragment in message and "mod:make" in message


def test_factory_arguments_a_factory_refuses_are_named(module_dir):
    name = module_dir(
        """
        def make(host):
            raise AssertionError("not reached")
        """
    )
    message = _spec_error(f"{name}:make?port=1")
    assert "unexpected keyword argument 'port'" in message


# -- one owner of the forms: built-in specs rewritten into factory specs for the workers ---------


@pytest.mark.parametrize("path", ["devices.toml", "1.5", "a b&c=d?.toml", '"quoted".toml'])
def test_a_sim_path_crosses_to_the_worker_as_text(tmp_path, path):
    table = tmp_path / path
    table.write_text('[devices."Z:ONLYME"]\nbase = 5.0\n')
    spec = factory_spec(f"sim:{table}")
    module, attr, kwargs = parse_factory(spec)  # what a worker reads
    assert (module, attr, kwargs) == ("pacsys.backends.spec", "sim_backend", {"devices": str(table)})
    backend = call_factory(spec)
    assert isinstance(backend, SimBackend) and "Z:ONLYME" in backend.table.names
    _close(backend)


def test_every_builtin_form_is_a_factory_spec_the_worker_runtime_builds():
    for spec, kind in [("sim", SimBackend), ("fake", FakeBackend), ("grpc://127.0.0.1:1?timeout=2", DAQClientBackend)]:
        rewritten = factory_spec(spec)
        assert parse_factory(rewritten) is not None, rewritten
        backend = call_factory(rewritten)
        assert isinstance(backend, kind)
        _close(backend)
    assert factory_spec("m.mod:make?x=1") == "m.mod:make?x=1"  # a factory spec is left as it is


def test_the_worker_runtime_knows_no_builtin_form():
    assert parse_factory("sim") is None and parse_factory("grpc://h:1") is None
    with pytest.raises(FactorySpecError, match="expected module:factory"):
        call_factory("fake")


def test_a_bad_grpc_spec_fails_in_the_front_before_any_worker_sees_it():
    with pytest.raises(BackendSpecError, match="expected grpc://HOST:PORT"):
        factory_spec("grpc://host")


def test_the_worker_describes_a_factory_without_its_argument_values():
    from workers.backend_spec import describe

    assert describe("m.mod:make?token=s3cret&port=1") == "m.mod:make(token=..., port=...)"
