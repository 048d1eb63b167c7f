"""pacsys.settings and what is built from it: the settings, the TOML file, policies, the write gate, the example file."""

import re
from pathlib import Path

import pytest

from pacsys.settings import FIELDS, POLICY_TYPES, ConfigError, Settings, load_config, settings_from
from pacsys.supervised import (
    DeviceAccessPolicy,
    RateLimitPolicy,
    ReadOnlyPolicy,
    RequestContext,
    SlewRatePolicy,
    ValueRangePolicy,
    WriteGrantPolicy,
    evaluate_policies,
    policy_config,
)
from pacsys.supervised.cli import main
from pacsys.supervised.example_config import render_example
from pacsys.supervised.gate import ServicerLimits
from pacsys.supervised.policy_config import build_policies, write_gate
from pacsys.supervised.startup_checks import resolve_token

EXAMPLE = Path(__file__).resolve().parent.parent / "ops" / "supervisor.example.toml"


def write(tmp_path: Path, text: str, name: str = "config.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def set_ctx(*devices: str) -> RequestContext:
    return RequestContext(
        drfs=list(devices),
        rpc_method="Set",
        peer="ipv4:127.0.0.1:5000",
        metadata={},
        values=[(d, 1.0) for d in devices],
        raw_request=None,
    )


# -- defaults and precedence ----------------------------------------------------------------------


def test_defaults():
    s = Settings()
    assert (s.host, s.port, s.workers, s.backend, s.threads_per_worker) == ("[::]", 50051, 2, "sim", 16)
    assert (s.token, s.token_file, s.allow_writes, s.metrics_port) == (None, None, (), None)
    assert (s.log_level, s.log_format, s.log_requests) == ("INFO", "kv", False)
    assert (s.max_drfs_per_request, s.max_settings_per_request, s.max_streams) == (1000, 100, 10000)
    assert (s.max_message_bytes, s.stream_buffer, s.shutdown_grace) == (4194304, 1000, 5.0)
    assert (s.min_workers_ready, s.ready_timeout, s.ping_interval, s.hang_timeout) == (1, 30.0, 1.0, 5.0)
    assert (s.restart_backoff_initial, s.restart_backoff_max, s.restart_stable_uptime) == (0.1, 5.0, 1.0)
    assert (s.restart_intensity, s.restart_period) == (5, 60.0)
    assert (s.recycle_rss_mb, s.recycle_requests, s.recycle_jitter, s.subscription_linger) == (0, 0, 0.1, 2.0)
    assert (s.audit_path, s.audit_proto_path, s.audit_log_responses, s.audit_flush_interval) == (None, None, False, 1)
    assert s.policies == ()


def test_every_field_documents_itself():
    for f in FIELDS.values():
        assert f.help and f.section, f.name
        assert isinstance(f.flag, bool), f.name
    assert not FIELDS["policies"].flag


def test_settings_are_frozen_and_a_replacement_is_checked():
    with pytest.raises(AttributeError):
        Settings().port = 1  # type: ignore[misc]
    assert Settings().replace(port=1).port == 1
    with pytest.raises(ConfigError, match="'port' must be an integer from 0 to 65535, got -1"):
        Settings().replace(port=-1)


def test_the_schema_names_every_policy_builder():
    assert set(policy_config._BUILDERS) == set(POLICY_TYPES)


def test_empty_file_is_the_defaults(tmp_path):
    path = write(tmp_path, "")
    assert load_config(path) == Settings(config=path)


def test_file_values_and_overrides_win(tmp_path):
    path = write(tmp_path, 'port = 1234\nworkers = 3\nbackend = "fake"\nallow_writes = ["M:*"]\n')
    s = load_config(path)
    assert (s.port, s.workers, s.backend, s.allow_writes, s.config) == (1234, 3, "fake", ("M:*",), path)
    merged = settings_from({"port": 1234, "workers": 3}, {"port": 5555, "workers": None}, source=path)
    assert (merged.port, merged.workers) == (5555, 3)  # None means "not given"


def test_override_of_allow_writes_replaces_the_file():
    s = settings_from({"allow_writes": ["M:*"]}, {"allow_writes": ["G:*"]})
    assert s.allow_writes == ("G:*",)


def test_token_override_replaces_the_other_token_source():
    s = settings_from({"token": "from-file"}, {"token_file": "/run/token"})
    assert (s.token, s.token_file) == (None, "/run/token")
    s = settings_from({"token_file": "/run/token"}, {"token": "cli"})
    assert (s.token, s.token_file) == ("cli", None)


def test_values_are_normalized():
    s = settings_from({"log_level": "debug", "log_format": "JSON", "shutdown_grace": 2}, {})
    assert (s.log_level, s.log_format, s.shutdown_grace) == ("DEBUG", "json", 2.0)
    assert isinstance(s.shutdown_grace, float)


def test_min_workers_ready_is_not_checked_in_process():
    assert settings_from({"workers": 0, "min_workers_ready": 3}, {}).workers == 0


# -- errors -----------------------------------------------------------------------------------------


def test_unknown_key_is_named_with_the_file(tmp_path):
    path = write(tmp_path, "wokers = 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: unknown key 'wokers'")
    assert "did you mean 'workers'" in str(err.value)
    assert err.value.key == "wokers"


def test_bad_port_message():
    with pytest.raises(ConfigError) as err:
        settings_from({"port": "abc"}, {}, source="config.toml")
    assert str(err.value) == "config.toml: 'port' must be an integer from 0 to 65535, got 'abc'"


def test_bad_override_names_the_option():
    with pytest.raises(ConfigError) as err:
        settings_from({}, {"port": 70000}, source="config.toml")
    assert str(err.value) == "--port must be an integer from 0 to 65535, got 70000"


@pytest.mark.parametrize(
    ("values", "key", "fragment"),
    [
        ({"port": 65536}, "port", "from 0 to 65535"),
        ({"port": True}, "port", "integer"),
        ({"port": 1.5}, "port", "integer"),
        ({"workers": -1}, "workers", "from 0 to 1024"),
        ({"threads_per_worker": 0}, "threads_per_worker", "from 1 to 4096"),
        ({"metrics_port": -1}, "metrics_port", "from 0 to 65535"),
        ({"metrics_port": 50051}, "metrics_port", "differ from 'port'"),
        ({"shutdown_grace": -1}, "shutdown_grace", ">= 0"),
        ({"ready_timeout": 0}, "ready_timeout", "> 0"),
        ({"hang_timeout": "5"}, "hang_timeout", "number"),
        ({"ping_interval": float("nan")}, "ping_interval", "number"),
        ({"recycle_jitter": 1.5}, "recycle_jitter", "from 0 to 1"),
        ({"log_format": "xml"}, "log_format", "kv, json"),
        ({"log_level": "LOUD"}, "log_level", "DEBUG"),
        ({"log_requests": "yes"}, "log_requests", "true or false"),
        ({"allow_writes": "M:*"}, "allow_writes", "list of strings"),
        ({"allow_writes": ["M:*", ""]}, "allow_writes", "empty pattern"),
        ({"host": "::1"}, "host", "brackets"),
        ({"host": 1}, "host", "string"),
        ({"backend": "nosuch"}, "backend", "sim, sim:PATH, fake"),
        ({"backend": "sim:"}, "backend", "devices file"),
        ({"backend": "grpc://host"}, "backend", "HOST:PORT"),
        ({"backend": "grpc://host:1?bogus=1"}, "backend", "bogus"),
        ({"audit_flush_interval": 0}, "audit_flush_interval", ">= 1"),
        ({"audit_proto_path": "/tmp/a.bin"}, "audit_proto_path", "audit_path"),
        ({"token": "t", "token_file": "/f"}, "token_file", "'token'"),
        ({"workers": 2, "min_workers_ready": 3}, "min_workers_ready", "must not exceed 'workers' (2)"),
        ({"restart_backoff_initial": 2.0, "restart_backoff_max": 1.0}, "restart_backoff_max", "below"),
        ({"policies": {"type": "read_only"}}, "policies", "array of tables"),
        ({"policies": [{"type": "nope"}]}, "policies[0]", "unknown type 'nope'"),
        ({"policies": [{"mode": "allow"}]}, "policies[0]", "needs a 'type'"),
        ({"config": "x.toml"}, "config", "cannot be set in the config file"),
        ({"backend": "mod:make?port"}, "backend", "key=value"),
        ({"backend": "mod:make?a=1&a=2"}, "backend", "given twice"),
        ({"worker_python": "/venv/bin/python", "workers": 0, "backend": "m:f"}, "worker_python", "workers >= 1"),
        ({"trusted_proxies": ["10.0.0.5", "haproxy"]}, "trusted_proxies", "IP addresses or networks (e.g. 10.0.0.5"),
        ({"trusted_proxies": ["10.0.0.5/24"]}, "trusted_proxies", "has host bits set"),
        ({"plaintext_port": 50052}, "plaintext_port", "needs 'tls_cert' and 'tls_key'"),
        ({"plaintext_port": 50051, "tls_cert": "c", "tls_key": "k"}, "plaintext_port", "differ from 'port'"),
        ({"connection_max_age": 0}, "connection_max_age", "> 0"),
        (
            {"plaintext_port": 50052, "tls_cert": "c", "tls_key": "k", "tls_client_ca": "ca"},
            "plaintext_port",
            "every client has a certificate",
        ),
    ],
)
def test_bad_values(values, key, fragment):
    with pytest.raises(ConfigError) as err:
        settings_from(values, {}, source="config.toml")
    message = str(err.value)
    assert message.startswith("config.toml: "), message
    assert key in message and fragment in message, message
    assert err.value.key == key


def test_good_backend_specs():
    for spec in ("sim", "sim:/etc/devices.toml", "fake", "grpc://daq:50051", "grpc://[::1]:1?timeout=3", "a.b:c.d"):
        assert Settings(backend=spec).backend == spec


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config.toml: invalid TOML"):
        load_config(write(tmp_path, "port = \n"))
    with pytest.raises(ConfigError, match=r"missing.toml: cannot read the config file"):
        load_config(str(tmp_path / "missing.toml"))


# -- policies ----------------------------------------------------------------------------------------

ALL_POLICIES = """
[[policies]]
type = "read_only"

[[policies]]
type = "device_access"
patterns = ["Z:*"]
mode = "deny"
action = "set"

[[policies]]
type = "device_access"
patterns = ["M:.*"]
syntax = "regex"
action = "set"

[[policies]]
type = "rate_limit"
max_requests = 10
window_seconds = 1

[[policies]]
type = "value_range"
limits = { "M:OUTTMP" = [40, 105.5] }

[[policies]]
type = "slew_rate"
limits = { "M:*" = { max_step = 5.0 }, "G:*" = { max_step = 1, max_rate = 0.5 } }

[[policies]]
type = "write_grant"
identities = ["CN=ops-*"]
patterns = ["Z:*"]

[[policies]]
type = "custom"
name = "five-per-minute"
factory = "pacsys.supervised:RateLimitPolicy"
args = { max_requests = 5, window_seconds = 60 }
"""


def test_each_policy_type_is_built_in_file_order(tmp_path):
    settings = load_config(write(tmp_path, ALL_POLICIES))
    built = build_policies(settings)
    kinds = [type(p) for p in built]
    assert kinds == [
        ReadOnlyPolicy,
        DeviceAccessPolicy,
        DeviceAccessPolicy,
        RateLimitPolicy,
        ValueRangePolicy,
        SlewRatePolicy,
        WriteGrantPolicy,
        RateLimitPolicy,
    ]
    assert {t["type"] for t in settings.policies} == set(POLICY_TYPES)
    assert built[-1].name == "five-per-minute"
    assert built[2].allows_writes and not built[1].allows_writes
    # the regex policy approves M:OUTTMP; the value range denies 200
    assert evaluate_policies(built[2:3], set_ctx("M:OUTTMP")).allowed
    ctx = RequestContext(["M:OUTTMP"], "Set", "ipv4:1.2.3.4:5", {}, [("M:OUTTMP", 200.0)], None)
    decision = built[4].check(ctx)
    assert not decision.allowed and "outside" in (decision.reason or "")


@pytest.mark.parametrize(
    ("table", "key", "fragment"),
    [
        ('type = "read_only"\nmode = "deny"', "mode", "not a parameter"),
        ('type = "device_access"', "patterns", "is required"),
        ('type = "device_access"\npatterns = "M:*"', "patterns", "list of device patterns"),
        ('type = "device_access"\npatterns = []', "patterns", "non-empty list"),
        ('type = "device_access"\npatterns = ["M:*"]\nmode = "maybe"', "mode", "allow, deny"),
        ('type = "device_access"\npatterns = ["M:*"]\nmdoe = "deny"', "mdoe", "did you mean 'mode'"),
        ('type = "device_access"\npatterns = ["M:*"]\naction = "write"', "action", "all, read, set"),
        ('type = "device_access"\npatterns = ["M:*"]\naction = "read"', "action", "no effect"),
        ('type = "device_access"\npatterns = ["(("]\nsyntax = "regex"', "patterns", "bad pattern"),
        ('type = "rate_limit"', "max_requests", "is required"),
        ('type = "rate_limit"\nmax_requests = 0', "max_requests", ">= 1"),
        ('type = "rate_limit"\nmax_requests = 5\nwindow_seconds = -1', "window_seconds", "> 0"),
        ('type = "value_range"', "limits", "is required"),
        ('type = "value_range"\nlimits = {}', "limits", "non-empty table"),
        ('type = "value_range"\nlimits = { "M:X" = [1] }', 'limits."M:X"', "[lo, hi]"),
        ('type = "value_range"\nlimits = { "M:X" = [2, 1] }', 'limits."M:X"', "above hi"),
        ('type = "value_range"\nlimits = { "M:X" = ["a", 1] }', 'limits."M:X"', "number"),
        ('type = "slew_rate"\nlimits = { "M:X" = 5 }', 'limits."M:X"', "max_step and/or max_rate"),
        ('type = "slew_rate"\nlimits = { "M:X" = { max_stp = 5 } }', "max_stp", "not a slew limit"),
        ('type = "slew_rate"\nlimits = { "M:X" = { max_step = -1 } }', "max_step", ">= 0"),
        ('type = "custom"', "factory", "is required"),
        ('type = "custom"\nfactory = "no colon"', "factory", "module:callable"),
        ('type = "custom"\nfactory = "nosuch_module_xyz:make"', "factory", "cannot load"),
        ('type = "custom"\nfactory = "pacsys.supervised:NoSuchPolicy"', "factory", "cannot load"),
        ('type = "custom"\nfactory = "pacsys.supervised:RateLimitPolicy"', "args", "rejected"),
        ('type = "custom"\nfactory = "pacsys.supervised:RateLimitPolicy"\nargs = 5', "args", "table"),
        ('type = "custom"\nfactory = "collections:OrderedDict"', "factory", "not a Policy"),
        ('type = "read_only"\nname = ""', "name", "non-empty string"),
        ('type = "write_grant"\nidentities = ["ops*"]\npatterns = ["Z:*"]', "identities", "not an identity pattern"),
        ('type = "write_grant"\nidentities = ["CN=a,CN=b"]\npatterns = ["Z:*"]', "identities", "names CN twice"),
    ],
)
def test_bad_policy_params(tmp_path, table, key, fragment):
    path = write(tmp_path, f'[[policies]]\ntype = "read_only"\n\n[[policies]]\n{table}\n')
    with pytest.raises(ConfigError) as err:
        build_policies(load_config(path))
    message = str(err.value)
    assert message.startswith(f"{path}: policies[1] ("), message
    assert key in message and fragment in message, message


# -- write gate, token, limits -------------------------------------------------------------------------


def test_write_gate_denies_writes_when_nothing_grants_them():
    chain = write_gate(Settings(), [])
    assert [type(p) for p in chain] == [ReadOnlyPolicy]
    assert not evaluate_policies(chain, set_ctx("M:OUTTMP")).allowed


def test_write_gate_puts_read_only_first_before_deny_only_policies():
    deny = DeviceAccessPolicy(["Z:*"], mode="deny")
    chain = write_gate(Settings(), [deny])
    assert [type(p) for p in chain] == [ReadOnlyPolicy, DeviceAccessPolicy]
    assert chain[1] is deny


def test_write_gate_appends_allow_writes():
    rate = RateLimitPolicy(100)
    chain = write_gate(Settings(allow_writes=("M:*",)), [rate])
    assert chain[0] is rate and len(chain) == 2
    assert isinstance(chain[1], DeviceAccessPolicy) and chain[1].allows_writes
    assert evaluate_policies(chain, set_ctx("M:OUTTMP")).allowed
    denied = evaluate_policies(chain, set_ctx("M:OUTTMP", "G:AMANDA"))
    assert not denied.allowed and "G:AMANDA" in (denied.reason or "")


def test_write_gate_leaves_a_granting_chain_alone():
    grant = DeviceAccessPolicy(["M:*"], mode="allow", action="set")
    original = [grant]
    assert write_gate(Settings(), original) == [grant]
    assert original == [grant]  # not modified in place


def test_resolve_token(tmp_path):
    assert resolve_token(Settings()) is None
    assert resolve_token(Settings(token="abc")) == "abc"
    assert resolve_token(Settings(token_file=write(tmp_path, "  s3cret\n", "token"))) == "s3cret"
    with pytest.raises(ConfigError, match="token_file.*empty"):
        resolve_token(Settings(token_file=write(tmp_path, "\n", "empty")))
    with pytest.raises(ConfigError, match="token_file.*cannot read"):
        resolve_token(Settings(token_file=str(tmp_path / "missing")))


def test_limits():
    got = ServicerLimits.from_settings(
        Settings(workers=0, max_drfs_per_request=7, max_settings_per_request=3, max_streams=9, stream_buffer=11)
    )
    assert (got.max_drfs_per_request, got.max_settings_per_request, got.max_streams, got.stream_buffer) == (7, 3, 9, 11)
    # With workers the pool owns the stream buffers; the servicer leaves their size alone.
    assert ServicerLimits.from_settings(Settings(workers=2, stream_buffer=11)).stream_buffer is None
    # A library user's ServicerLimits() has the settings' defaults: one owner.
    assert ServicerLimits().max_streams == Settings().max_streams and ServicerLimits().max_rate_hz == 1440.0


# -- the example file ------------------------------------------------------------------------------------


def test_example_file_is_render_example():
    assert EXAMPLE.read_text() == render_example(), (
        "ops/supervisor.example.toml is stale: python -m pacsys.supervised.example_config > ops/supervisor.example.toml"
    )


def test_example_mentions_every_file_setting_and_policy_type():
    text = render_example()
    for name, f in FIELDS.items():
        if f.in_file and name != "policies":
            assert re.search(rf"^#{name} = ", text, re.MULTILINE), name
            assert f.help in text
    for kind in POLICY_TYPES:
        assert f'#type = "{kind}"' in text


def test_example_as_is_gives_the_defaults(tmp_path):
    path = write(tmp_path, render_example())
    assert load_config(path) == Settings(config=path)


def test_example_uncommented_is_valid(tmp_path):
    # Remove the '#' of every setting and policy line (not of help lines); token and token_file
    # are exclusive, so the token stays commented out, and so are tls_client_ca and plaintext_port.
    lines = [
        line[1:] if re.match(r"#[\w\[]", line) and not line.startswith(("#token =", "#plaintext_port =")) else line
        for line in render_example().splitlines()
    ]
    settings = load_config(write(tmp_path, "\n".join(lines) + "\n"))
    assert settings.metrics_port == 9109 and settings.token_file is not None
    assert [t["type"] for t in settings.policies] == list(POLICY_TYPES)
    # the custom example names a site module that does not exist here; build the others
    builtin = settings.replace(policies=settings.policies[:-1])
    assert len(build_policies(builtin)) == len(POLICY_TYPES) - 1


# -- check-config ------------------------------------------------------------------------------------------


def test_check_config_ok(tmp_path, capsys):
    path = write(tmp_path, 'workers = 4\nallow_writes = ["M:*"]\n' + ALL_POLICIES)
    assert main(["check-config", path]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: OK") and "4 workers" in out and "8 policies" in out


def test_check_config_counts_in_words(tmp_path, capsys):
    path = write(tmp_path, 'workers = 1\n[[policies]]\ntype = "read_only"\n')
    assert main(["check-config", "-q", path]) == 0
    assert capsys.readouterr().out == f"{path}: OK (backend sim, 1 worker, 1 policy, writes denied)\n"


def test_check_config_reports_writes_denied(tmp_path, capsys):
    assert main(["check-config", write(tmp_path, "")]) == 0
    assert "writes denied" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("wokers = 2\n", "unknown key 'wokers'"),
        ('port = "abc"\n', "'port' must be an integer"),
        ('backend = "no such backend"\n', "'backend' must be"),
        ('[[policies]]\ntype = "rate_limit"\n', "policies[0] (rate_limit): 'max_requests' is required"),
        ('token_file = "/nonexistent/token"\n', "token_file"),
        ("port = \n", "invalid TOML"),
    ],
)
def test_check_config_errors(tmp_path, capsys, text, fragment):
    path = write(tmp_path, text)
    assert main(["check-config", path]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("pacsys-supervisor: error: ") and fragment in captured.err, captured.err
    assert "Traceback" not in captured.err and "OK" not in captured.out


def test_check_config_missing_file_and_usage(tmp_path, capsys):
    assert main(["check-config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["check-config"]) == 2  # usage error from argparse


def test_worker_python_and_factory_arguments_from_file_and_command_line(tmp_path):
    spec = "pacsys.backends.grpc_backend:GRPCBackend?host=127.0.0.1&port=50051"
    path = write(tmp_path, f'backend = "{spec}"\nworker_python = "/opt/release/bin/python"\n')
    s = load_config(path)
    assert (s.backend, s.worker_python) == (spec, "/opt/release/bin/python")
    s = settings_from({}, {"backend": "m:make?x=1", "worker_python": "/p/python"}, source="cmd")
    assert (s.backend, s.worker_python) == ("m:make?x=1", "/p/python")
