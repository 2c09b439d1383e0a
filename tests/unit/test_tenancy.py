"""Start-ups as tenants: own lake prefix, own Slurm account, admission before anything runs,
and the site's Slurm limits. No services: every refusal comes before one is touched."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from aifactory.tasks.cli import main
from aifactory.tasks.core.config import load_profile
from aifactory.tasks.core.errors import TenancyError
from aifactory.tasks.core.tenancy import check_dataspace_url, check_isolation, check_run, reaches

PREFIX_B = "isolation.s3_prefix: start-up startup-a may not use s3://aif-lake/startup-b/...: " \
           "that prefix belongs to startup-b"  # fmt: skip


def _site(**env: str) -> Any:
    return load_profile("site", env={**os.environ, **env})


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("aif: error: ") and "\n" not in err, err
    return err


def _site_file(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of the site profile with ``old`` replaced (tenancy changed in the file)."""
    src = Path("infra/profiles/site.yaml").read_text()
    assert old in src, old
    path = tmp_path / "site-variant.yaml"
    path.write_text(src.replace(old, new, 1))
    return path


# -- the lake of a start-up's runs -----------------------------------------------------
def test_lake_url_is_the_startups_prefix(tmp_path: Path) -> None:
    cfg = _site()
    assert cfg.lake.url == "s3://aif-lake"
    assert cfg.lake_url_for("startup-a") == "s3://aif-lake/startup-a"
    assert cfg.lake_url_for(None) == "s3://aif-lake/startup-a"  # the default start-up
    assert cfg.lake_url_for("startup-c") == "s3://aif-lake/startup-c"
    local = load_profile("local", env={"AIF_HOME": str(tmp_path / "h")}, base_dir=tmp_path)
    assert local.lake_url_for("startup-b") == f"file://{tmp_path}/h/local/lake/startup-b"
    # a lake moved by an override to a fresh place keeps the layout
    moved = _site(AIF_LAKE__URL="s3://aif-lake/bench-1")
    assert moved.lake_url_for("startup-a") == "s3://aif-lake/bench-1/startup-a"
    ehpc = load_profile("eurohpc-example", env={**os.environ, "AIF_ACCOUNT": "ehpc-1"})
    assert ehpc.lake_url_for(None).endswith("/ehpc-aif-042")


def test_startup_without_prefix_uses_the_root_only_when_nobody_has_one(tmp_path: Path) -> None:
    from aifactory.tasks.core.config import Startup
    from aifactory.tasks.core.tenancy import tenant_lake_url

    assert tenant_lake_url("file:///l/", Startup(account="x")) == "file:///l"
    assert tenant_lake_url("s3://b", Startup(account="x", s3_prefix="/t/a/")) == "s3://b/t/a"
    cfg = load_profile(
        str(_site_file(tmp_path, ", s3_prefix: startup-a", "")), env=dict(os.environ)
    )
    with pytest.raises(TenancyError, match=r"^isolation\.s3_prefix: start-up startup-a has no "):
        cfg.lake_url_for("startup-a")
    # a run's override of the prefix is refused when the profile is loaded, naming the breach
    with pytest.raises(TenancyError, match=r"^isolation\.s3_prefix: start-up startup-a has no "):
        _site(**{"AIF_STARTUPS__STARTUP-A__S3_PREFIX": ""})


# -- isolation.s3_prefix ----------------------------------------------------------------
def test_lake_override_into_another_prefix_is_refused() -> None:
    cfg = _site(AIF_LAKE__URL="s3://aif-lake/startup-b")
    with pytest.raises(TenancyError) as e:
        cfg.lake_url_for("startup-a")
    assert str(e.value).startswith(PREFIX_B) and e.value.exit_code == 6
    assert "its lake would be s3://aif-lake/startup-b/startup-a" in str(e.value)
    # the same lake is startup-b's own: allowed for startup-b
    assert cfg.lake_url_for("startup-b") == "s3://aif-lake/startup-b/startup-b"


@pytest.mark.parametrize("prefix", ["startup-b", "startup-b/mine", "../startup-b", "./startup-b"])
def test_prefix_override_onto_another_is_refused(prefix: str) -> None:
    with pytest.raises(TenancyError, match=r"^isolation\.s3_prefix: start-up startup-a ") as e:
        _site(**{"AIF_STARTUPS__STARTUP-A__S3_PREFIX": prefix})
    assert "besides, AIF_STARTUPS__STARTUP-A__S3_PREFIX may not change " in str(e.value)


@pytest.mark.parametrize(
    "url",
    [
        "s3://aif-lake/startup-b/objects/mobility-trips",
        "s3://aif-lake/startup-b/objects/mobility-trips/*.parquet",
        "s3://aif-lake/startup-*/objects/*/x.parquet",
        "s3://aif-lake/**/*.parquet",
        "s3://aif-lake/startup-a/../startup-b/x",
        "s3://aif-lake",  # a folder above theirs: its listing would reach into it
    ],
)
def test_dataspace_into_another_prefix_is_refused(url: str) -> None:
    cfg = _site(AIF_DATASPACE__URL=url)
    with pytest.raises(TenancyError) as e:
        check_run(cfg, "startup-a")
    assert str(e.value).startswith(PREFIX_B) and f"dataspace.url {url}" in str(e.value)


@pytest.mark.parametrize(
    "url",
    [
        "s3://aif-dataspace/mobility/trips",
        "s3://aif-lake/startup-a/objects/mobility-trips",  # its own lake
        "s3://aif-lake/*.parquet",  # top level only: no prefix is listed
        "file:///data/startup-b",  # another store
    ],
)
def test_dataspace_elsewhere_is_allowed(url: str) -> None:
    check_run(_site(AIF_DATASPACE__URL=url), "startup-a")


def test_reaches() -> None:
    assert reaches("s3://l/b/x", "s3://l/b") and reaches("s3://l/b", "s3://l/b")
    assert not reaches("s3://l/bb", "s3://l/b") and not reaches("gs://l/b", "s3://l/b")
    assert not reaches("s3://l", "s3://l/b") and reaches("s3://l", "s3://l/b", listing=True)
    assert not reaches("s3://l/*", "s3://l/b/c", listing=True)
    assert reaches("s3://l/?/c", "s3://l/b/c") and reaches("/abs/b/x", "file:///abs/b")


PREFIX_A = "isolation.s3_prefix: start-up startup-b may not use s3://aif-lake/startup-a/...: " \
           "that prefix belongs to startup-a"  # fmt: skip


@pytest.mark.parametrize(
    "url",
    [
        "s3a://aif-lake/startup-a/objects/mobility-trips/*.parquet",  # the spellings
        "simplecache::s3://aif-lake/startup-a/objects/mobility-trips",
        "simplecache::s3a://aif-lake/startup-a",
        "s3://aif-lake//startup-a/x",
        "S3A://aif-lake/./startup-a/x",
        "s3n://aif-lake/startup-a/x",
        "filecache::s3a://aif-lake/startup-a/x",
        "blockcache::simplecache::S3://aif-lake/startup-a/x",  # any chain: its last target
        "zip://trips.csv::s3a://aif-lake/startup-a/x.zip",
        "s3::aif-lake/startup-a",  # fsspec reads the root of s3 here: a folder above all
        "s3://AIF-LAKE/startup-a/x",  # bucket names know no case
        "s3://aif-lake/startup%2Da/x",  # percent-decoded by some readers
        "s3://aif-lake/startup-a?versionId=1",
        "s3://aif-lake/startup-a/../../aif-lake/startup-a/x",
        "s3://aif-lake/startup-a/../startup-b/x",  # as written: S3 keeps '..' in a key
        "simplecache::s3a://aif-lake",  # a folder above theirs
        "http://127.0.0.1:9010/aif-lake/startup-a/x",  # the object store's endpoint
        "https://aif-lake.s3.amazonaws.com/startup-a/x",  # virtual-hosted style
    ],
)
def test_another_spelling_of_another_prefix_is_refused(url: str) -> None:
    """The place fsspec would read is compared, not the URL's text (issue 15, item 4)."""
    cfg = _site(AIF_DATASPACE__URL=url)
    with pytest.raises(TenancyError) as e:
        check_run(cfg, "startup-b")
    msg = str(e.value)
    assert msg.startswith(PREFIX_A) and f"(dataspace.url {url})" in msg and "\n" not in msg
    assert e.value.exit_code == 6


@pytest.mark.parametrize(
    "lake",
    [
        "s3a://aif-lake/startup-b",
        "simplecache::S3://aif-lake//startup-b",
        "S3N://AIF-LAKE/startup-b/.",
    ],
)
def test_lake_override_spelled_otherwise_into_another_prefix_is_refused(lake: str) -> None:
    with pytest.raises(
        TenancyError, match=r"^isolation\.s3_prefix: start-up startup-a may not use "
    ):
        _site(AIF_LAKE__URL=lake).lake_url_for("startup-a")


@pytest.mark.parametrize(
    "url",
    [
        "s3a://aif-lake/startup-b/objects/x/*.parquet",  # its own prefix, spelled otherwise
        "simplecache::s3://aif-lake/startup-b/x",
        "s3://aif-lake/startup-ab/x",  # not a prefix of another's
        "memory://aif-lake/startup-a/x",  # another store
        "gs://aif-lake/startup-a/x",
        "https://opendata.example.org/mobility/trips.csv",
    ],
)
def test_other_spellings_elsewhere_are_allowed(url: str) -> None:
    check_run(_site(AIF_DATASPACE__URL=url), "startup-b")


def test_reaches_compares_resolved_locations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert reaches("gcs://B/k/x", "gs://b/k") and reaches("GS://b//k", "gcs://b/k")
    assert reaches("abfss://c@acct.dfs.core.windows.net/k/x", "az://c/k")
    assert reaches("adl://c/k", "abfs://c/k") and not reaches("az://c/k", "s3://c/k")
    monkeypatch.chdir(tmp_path)
    lake = f"file://{tmp_path}/lake/startup-a"
    spellings = [
        f"{tmp_path}/lake/startup-a/x",
        "lake/startup-a",
        "./lake/../lake/startup-a",
        f"local://{tmp_path}//lake/startup-a",
        f"file:{tmp_path}/lake/startup-a",
        "file://lake/startup-a",
        f"simplecache::file://{tmp_path}/lake/startup-a",
    ]
    for url in spellings:
        assert reaches(url, lake), url
    (tmp_path / "lake" / "startup-a").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_path / "lake" / "startup-a")
    assert reaches(f"{tmp_path}/alias/x", lake)  # a symlink into it is it
    assert not reaches("lake/startup-b", lake) and not reaches("s3://lake/startup-a", lake)
    for odd in ("", "::", "a::b::", "http://", "s3://", "data:text/plain,x", "%", "weird+x://?"):
        reaches(odd, "s3://aif-lake/startup-a", listing=True)  # no crash, whatever it says


def test_cli_dataspace_flag_into_another_prefix_exits_6(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("aifactory.tasks.cli._use_prefect", _no_service)
    url = "s3://aif-lake/startup-b/objects/mobility-trips/*.parquet"
    assert main(["run", "--profile", "site", "--dataspace", url, "--dry-run"]) == 6
    assert _one_error(capsys) == (f"aif: error: {PREFIX_B} (dataspace.url {url})")
    assert main(["ingest", "--profile", "site", "--dataspace", url]) == 6
    assert PREFIX_B in _one_error(capsys)


def test_cli_lake_override_into_another_prefix_exits_6(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("aifactory.tasks.cli._use_prefect", _no_service)
    monkeypatch.setenv("AIF_LAKE__URL", "s3://aif-lake/startup-b")
    for argv in (["run", "--profile", "site", "--dry-run"], ["snapshot", "ls", "--profile", "site"],
                 ["sweep", "--profile", "site", "--grid", "lr=0.1,0.2"]):  # fmt: skip
        assert main(argv) == 6, argv
        assert PREFIX_B in _one_error(capsys)


def test_train_lm_data_into_another_prefix_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("aifactory.tasks.cli._use_prefect", _no_service)
    url = "s3://aif-lake/startup-b/objects/x/*.parquet"
    assert main(["train-lm", "--profile", "site", "--data", url]) == 6
    assert "that prefix belongs to startup-b" in _one_error(capsys)


def test_check_dataspace_url_names_what() -> None:
    with pytest.raises(TenancyError, match=r"\(train-lm --data s3://aif-lake/startup-c/x\)$"):
        check_dataspace_url(_site(), "startup-a", "s3://aif-lake/startup-c/x", "train-lm --data")


# -- isolation.overrides ----------------------------------------------------------------
OVERRIDES = "isolation.overrides: {where} may not change {keys}: a start-up's tenancy comes only " \
            "from the profile file "  # fmt: skip


def test_a_runs_environment_never_changes_tenancy(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15, item 4: moving A's prefix away and giving B A's prefix by the environment."""
    monkeypatch.setenv("AIF_STARTUPS__STARTUP-A__S3_PREFIX", "moved")
    monkeypatch.setenv("AIF_STARTUPS__STARTUP-B__S3_PREFIX", "startup-a")
    want = OVERRIDES.format(
        where="AIF_STARTUPS__STARTUP-A__S3_PREFIX, AIF_STARTUPS__STARTUP-B__S3_PREFIX",
        keys="startups.startup-a.s3_prefix, startups.startup-b.s3_prefix",
    )
    with pytest.raises(TenancyError) as e:
        load_profile("site")
    assert str(e.value).startswith(want) and e.value.exit_code == 6, str(e.value)
    assert str(e.value).endswith("site.yaml, never from a run's environment or overrides")
    monkeypatch.setattr("aifactory.tasks.cli._use_prefect", _no_service)
    url = "s3://aif-lake/startup-a/objects/mobility-trips/*.parquet"
    assert main(["ingest", "--profile", "site", "--startup", "startup-b", "--dataspace", url]) == 6
    assert _one_error(capsys).startswith(f"aif: error: {want}")


@pytest.mark.parametrize(
    "name, value",
    [
        ("AIF_STARTUPS__STARTUP_B__S3_PREFIX", "elsewhere"),  # a fresh prefix: still refused
        ("AIF_STARTUPS__STARTUP_B__ACCOUNT", "startup-b-2"),
        ("AIF_STARTUPS__STARTUP_B__PARTITIONS", "[cpu, gpu, bigmem]"),
        ("AIF_STARTUPS__STARTUP_B__QOS", "[normal, high]"),
        ("AIF_STARTUPS__STARTUP_B__PROJECT", "other"),
        ("AIF_STARTUPS__STARTUP_B", "{s3_prefix: elsewhere}"),
        ("AIF_STARTUPS__STARTUP_D__ACCOUNT", "startup-d"),  # a start-up the file lacks
    ],
)
def test_every_tenancy_key_of_the_environment_is_refused(name: str, value: str) -> None:
    with pytest.raises(TenancyError) as e:
        _site(**{name: value})
    msg = str(e.value)
    assert f"{name} may not change startups.startup" in msg and "\n" not in msg, msg
    assert "tenancy comes only from the profile file " in msg


@pytest.mark.parametrize(
    "overrides, where",
    [
        ({"startups.startup-b.s3_prefix": "elsewhere"}, "override startups.startup-b.s3_prefix"),
        ({"startups": {"startup-b": {"qos": ["high"]}}}, "override startups"),
        ({"startups.startup-b": {"account": "x"}}, "override startups.startup-b"),
        ({"startups.startup-b": "x"}, "override startups.startup-b"),
    ],
)
def test_tenancy_overrides_of_a_run_are_refused(overrides: dict[str, Any], where: str) -> None:
    with pytest.raises(TenancyError, match=rf"^isolation\.overrides: {re.escape(where)} may not "):
        load_profile("site", overrides, env=dict(os.environ))


def test_admission_keys_may_still_be_overridden_per_run() -> None:
    cfg = _site(AIF_STARTUPS__STARTUP_C__DECLARATION__APPROVED_BY="E. Novak",
                AIF_STARTUPS__STARTUP_A__BUDGET_SINCE="now-30days")  # fmt: skip
    assert cfg.startups["startup-c"].declaration.approved_by == "E. Novak"  # type: ignore[union-attr]
    assert cfg.startups["startup-a"].budget_since == "now-30days"
    check_run(cfg, "startup-a")


# -- isolation.account ------------------------------------------------------------------
def test_account_of_another_startup_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    shared = _site_file(tmp_path, "{account: startup-a,", "{account: startup-b,")
    cfg = load_profile(str(shared), env=dict(os.environ))
    with pytest.raises(TenancyError) as e:
        cfg.tenant("startup-a")
    assert (
        str(e.value).startswith(
            "isolation.account: start-up startup-a may not run under Slurm account startup-b: "
            "that account belongs to startup-b"
        )
        and e.value.exit_code == 6
    )
    with pytest.raises(TenancyError, match=r"^isolation\.account: start-up startup-b "):
        cfg.lake_url_for("startup-b")  # both start-ups of a shared account are refused
    cfg.tenant("startup-c")  # the others run on
    # by a run's environment: refused when the profile is loaded, the breach named first
    monkeypatch.setenv("AIF_STARTUPS__STARTUP-A__ACCOUNT", "startup-b")
    monkeypatch.setattr("aifactory.tasks.cli._use_prefect", _no_service)
    assert main(["run", "--profile", "site", "--dry-run"]) == 6
    err = _one_error(capsys)
    assert err.startswith("aif: error: isolation.account: start-up startup-a may not run under "
                          "Slurm account startup-b: that account belongs to startup-b")  # fmt: skip
    assert "besides, AIF_STARTUPS__STARTUP-A__ACCOUNT may not change startups.startup-a." in err
    assert main(["sweep", "--profile", "site", "--grid", "lr=0.1,0.2"]) == 6
    assert "isolation.account" in _one_error(capsys)


def test_a_profile_where_two_startups_share_an_account(tmp_path: Path) -> None:
    src = Path("infra/profiles/site.yaml").read_text()
    shared = src.replace("{account: startup-c,", "{account: startup-b,")
    assert shared != src
    path = tmp_path / "shared.yaml"
    path.write_text(shared)
    cfg = load_profile(str(path), env=dict(os.environ))
    with pytest.raises(TenancyError, match="that account belongs to startup-c"):
        check_run(cfg, "startup-b")
    check_run(cfg, "startup-a")


def test_flows_check_isolation_in_their_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The train and register tasks, and replay, use Profile.tenant / lake_url_for: a
    changed environment between stages is refused there too."""
    import inspect

    import aifactory.flows.preprocess
    import aifactory.flows.register
    import aifactory.flows.sweep
    import aifactory.flows.train
    import aifactory.tasks.stages.replay

    af = aifactory.flows
    for mod in (af.train, af.register, af.sweep, aifactory.tasks.stages.replay):
        assert ".tenant(" in inspect.getsource(mod), mod.__name__
    for mod in (af.preprocess, af.register, aifactory.tasks.stages.replay):
        src = inspect.getsource(mod)
        assert "lake_url_for(" in src and "lake.url" not in src, mod.__name__


# -- admission before anything runs -----------------------------------------------------
def _no_service(*_a: Any, **_k: Any) -> Any:
    raise AssertionError("a service was touched before the refusal")


def test_pipeline_refuses_unapproved_declaration_before_ingest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import aifactory.flows.pipeline as fp
    from aifactory.tasks.jobs.admission import AdmissionError

    monkeypatch.setattr(fp, "ingest_flow", _no_service)
    with pytest.raises(AdmissionError) as e:
        fp.pipeline.fn(profile="site", startup="startup-c")
    assert "refused by admission.declaration: the project has a declaration not approved" in str(
        e.value
    ) and str(e.value).startswith("run for startup-c (project readmission-risk)")
    with pytest.raises(TenancyError):  # isolation first, also before ingest
        fp.pipeline.fn(profile="site", overrides={"lake.url": "s3://aif-lake/startup-c"})


def test_sweep_refuses_unapproved_declaration_before_anything(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import aifactory.flows.sweep as fs
    from aifactory.tasks.jobs.admission import AdmissionError

    monkeypatch.setattr("aifactory.tasks.cli._use_prefect", _no_service)
    assert main(["sweep", "--profile", "site", "--startup", "startup-c",
                 "--grid", "lr=0.1,0.2"]) == 5  # fmt: skip
    err = _one_error(capsys)
    assert "sweep for startup-c (project readmission-risk): refused by admission.declaration" in err
    monkeypatch.setattr(fs, "ingest_flow", _no_service)
    with pytest.raises(AdmissionError, match=r"admission\.declaration"):
        fs.sweep_flow.fn(profile="site", startup="startup-c", trials=[{"lr": 0.1}])


def test_budget_override_by_environment_is_refused_with_hours() -> None:
    from aifactory.tasks.doors.slurm import SlurmClient
    from aifactory.tasks.jobs.admission import AdmissionError, admit

    class Sacct(SlurmClient):
        def run(self, args: Any, **_k: Any) -> str:
            return (
                "JobID|Account|AllocTRES|ElapsedRaw\n"
                "7|startup-a|billing=1,cpu=1,gres/gpu=1,mem=2G,node=1|360"
            )  # 0.1 GPU-h

    cfg = _site(**{"AIF_STARTUPS__STARTUP-A__GPU_HOURS_BUDGET": "0.25"})
    sid, st = cfg.tenant("startup-a")
    assert st.gpu_hours_budget == 0.25
    with pytest.raises(AdmissionError) as e:
        admit(sid, st, cfg.training, Sacct())
    msg = str(e.value)
    assert "refused by admission.budget: GPU-hours used 0.10 since now-365days" in msg
    assert "remaining 0.15 of 0.25, requested 0.33" in msg and e.value.exit_code == 5


# -- the site's own Slurm limits ---------------------------------------------------------
def test_site_up_sets_grp_tres_mins_from_the_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    from aifactory.infra.site import manager
    from aifactory.infra.site import slurm_parts as sp

    assert sp.budget_limit_args("startup-a", 500) == [
        "modify", "account", "startup-a", "set", "GrpTRESMins=gres/gpu=30000"]  # fmt: skip
    assert sp.budget_limit_args("x", 0.5)[-1] == "GrpTRESMins=gres/gpu=30"
    assert sp.budget_limit_args("x", None)[-1] == "GrpTRESMins=gres/gpu=-1"  # no cap
    # one run's override never changes the site's limits
    monkeypatch.setenv("AIF_STARTUPS__STARTUP-A__GPU_HOURS_BUDGET", "1")
    assert sp.site_budgets() == {"startup-a": 500, "startup-b": 500, "startup-c": 100}
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(sp, "sacctmgr", lambda site, *args: calls.append(args) or "")
    sp.ensure_budget_limits(None)  # type: ignore[arg-type]
    assert [c[-1] for c in calls] == ["GrpTRESMins=gres/gpu=30000",
                                      "GrpTRESMins=gres/gpu=30000",
                                      "GrpTRESMins=gres/gpu=6000"]  # fmt: skip
    # After slurmctld is up: a fresh slurmdbd knows gres/gpu only once slurmctld registered it.
    ctld = next(p for p in manager.PARTS if p.name == "slurmctld")
    dbd = next(p for p in manager.PARTS if p.name == "slurmdbd")
    assert ctld.after is not None and dbd.after is not None
    calls.clear()
    monkeypatch.setattr(sp, "ensure_accounts", lambda site: calls.append(("accounts",)))
    dbd.after(None, print)  # type: ignore[arg-type]
    assert calls[-1] == ("accounts",) and not any(c[0] == "modify" for c in calls)
    ctld.after(None, print)  # type: ignore[arg-type]
    assert calls[-1][0] == "modify"


@pytest.mark.parametrize(
    "override, rule",
    [
        ({"training.partition": "bigmem"}, "isolation.partition: start-up startup-a may not use "
                                           "partition 'bigmem' (training.partition)"),
        ({"dask.partition": "gpu-large"}, "isolation.partition"),
        ({"training.qos": "high"}, "isolation.qos: start-up startup-a may not use qos 'high'"),
        ({"dask.qos": "high"}, "(dask.qos): allowed are normal"),
    ],
)  # fmt: skip
def test_partition_and_qos_outside_the_startups_allowed_are_refused(
    override: dict[str, str], rule: str
) -> None:
    cfg = load_profile("site", override)
    with pytest.raises(TenancyError, match=re.escape(rule)):
        check_isolation(cfg, "startup-a")


def test_allowed_partition_and_qos_pass() -> None:
    check_isolation(load_profile("site", {"training.qos": "normal", "dask.partition": "gpu"}),
                    "startup-a")  # fmt: skip


def test_cli_partition_override_exits_6(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setenv("AIF_TRAINING__PARTITION", "bigmem")
    assert main(["run", "--profile", "site", "--dry-run"]) == 6
    assert "isolation.partition" in capsys.readouterr().err
