"""Site config templates: every placeholder filled, the facts Slurm needs present."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from aifactory.infra.site import slurm_parts
from aifactory.infra.site.layout import TEMPLATES, Site, host, memory_mb


def _conf(text: str) -> dict[str, str]:
    """Key=value lines of a Slurm config (first occurrence), comments dropped."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "=" in line and " " not in line:
            key, value = line.split("=", 1)
            out.setdefault(key, value)
    return out


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path / "site")


def test_templates_render_without_leftover_placeholders(site: Site) -> None:
    confs = slurm_parts.render_confs(site)
    assert set(confs) == {"slurm.conf", "gres.conf", "slurmdbd.conf"}
    for name, text in confs.items():
        assert not re.search(r"\$\{?\w", text), f"{name} has an unfilled placeholder"


def test_slurm_conf_has_the_site_facts(site: Site) -> None:
    text = slurm_parts.render_confs(site)["slurm.conf"]
    conf = _conf(text)
    assert conf["ClusterName"] == "aif"
    assert conf["SlurmctldHost"].startswith(host())
    assert conf["SlurmUser"] == "root"
    assert conf["SlurmctldPort"] == "6817" and conf["SlurmdPort"] == "6818"
    assert conf["AuthInfo"] == f"socket={site.munge_socket}"
    assert conf["SelectType"] == "select/cons_tres"
    assert conf["SelectTypeParameters"] == "CR_Core_Memory"
    assert conf["ProctrackType"] == "proctrack/linuxproc"
    assert conf["TaskPlugin"] == "task/none"
    assert conf["DefMemPerCPU"] == "1024"
    assert conf["GresTypes"] == "gpu"
    assert conf["AccountingStorageType"] == "accounting_storage/slurmdbd"
    assert conf["AccountingStorageHost"] == "127.0.0.1"
    assert conf["AccountingStoragePort"] == "6819"
    assert conf["AccountingStorageEnforce"] == "associations,limits,qos"
    assert conf["AccountingStorageTRES"] == "gres/gpu"
    assert conf["JobAcctGatherType"] == "jobacct_gather/linux"
    assert conf["MinJobAge"] == "300" and conf["KillWait"] == "10"
    # Fair-share between the start-ups' accounts (issue 19), not first come first served.
    assert conf["PriorityType"] == "priority/multifactor"
    assert int(conf["PriorityWeightFairshare"]) > int(conf["PriorityWeightAge"]) > 0
    for key in ("StateSaveLocation", "SlurmdSpoolDir", "SlurmctldPidFile", "SlurmctldLogFile"):
        assert conf[key].startswith(str(site.root)), key
    node = next(ln for ln in text.splitlines() if ln.startswith("NodeName="))
    assert f"CPUs={os.cpu_count()}" in node and "Gres=gpu:2" in node
    assert f"RealMemory={memory_mb()}" in node
    parts = [ln for ln in text.splitlines() if ln.startswith("PartitionName=")]
    assert [p.split()[0] for p in parts] == ["PartitionName=cpu", "PartitionName=gpu"]
    assert "Default=YES" in parts[0] and all("MaxTime=INFINITE" in p for p in parts)


def test_gres_conf_points_at_the_site_devices(site: Site) -> None:
    text = slurm_parts.render_confs(site)["gres.conf"]
    assert "AutoDetect=off" in text
    assert f"Name=gpu File={site.dev_dir}/nvidia[0-1]" in text


def test_slurmdbd_conf_uses_site_socket_and_database(site: Site) -> None:
    conf = _conf(slurm_parts.render_confs(site)["slurmdbd.conf"])
    assert conf["AuthInfo"] == f"socket={site.munge_socket}"
    assert conf["DbdPort"] == "6819"
    assert conf["StorageHost"] == "127.0.0.1" and conf["StoragePort"] == "3307"
    assert conf["StoragePass"] == site.db_password()


def test_db_password_is_private_and_stable(site: Site) -> None:
    first = site.db_password()
    assert len(first) == 32 and site.db_password() == first
    assert stat.S_IMODE((site.root / "mysql-slurm.pass").stat().st_mode) == 0o600


def test_render_writes_confs_with_modes(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Site] = []
    monkeypatch.setattr(slurm_parts, "make_gpu_devices", made.append)
    slurm_parts.render(site)
    assert made == [site]
    mode = {n: stat.S_IMODE((site.slurm_dir / n).stat().st_mode) for n in slurm_parts.CONFS}
    assert mode == {"slurm.conf": 0o644, "gres.conf": 0o644, "slurmdbd.conf": 0o600}
    assert (site.slurm_dir / "state").is_dir() and (site.slurm_dir / "spool").is_dir()
    assert not list(site.slurm_dir.glob("*.tmp"))


def test_a_missing_template_key_raises(site: Site, tmp_path: Path) -> None:
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    for name in slurm_parts.CONFS:
        (tpl / name).write_text((TEMPLATES / name).read_text())
    (tpl / "gres.conf").write_text("Name=gpu File=${no_such_key}\n")
    with pytest.raises(KeyError, match="no_such_key"):
        slurm_parts.render_confs(site, templates=tpl)


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a character device needs root")
def test_gpu_devices_are_character_devices(site: Site) -> None:
    slurm_parts.make_gpu_devices(site)
    slurm_parts.make_gpu_devices(site)  # idempotent
    for i in (0, 1):
        st = (site.dev_dir / f"nvidia{i}").stat()
        assert stat.S_ISCHR(st.st_mode)
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (195, i)


def test_a_multi_node_site_names_each_node_at_its_bridge_address(tmp_path: Path) -> None:
    site = Site(tmp_path / "site", nodes=3, gpus_per_node=1)
    confs = slurm_parts.render_confs(site)
    text = confs["slurm.conf"]
    conf = _conf(text)
    assert conf["SlurmctldHost"] == f"{host()}(10.87.0.1)"
    assert conf["SlurmdSpoolDir"].endswith("/spool/%n")  # one spool, pid and log per node
    assert conf["SlurmdPidFile"].endswith("slurmd-%n.pid")
    assert conf["SlurmdTimeout"] == "15" and conf["AuthInfo"].endswith(",cred_expire=30")
    lines = [ln for ln in text.splitlines() if ln.startswith("NodeName=")]
    assert [ln.split()[:2] for ln in lines] == [
        ["NodeName=aif-n1", "NodeAddr=10.87.0.11"], ["NodeName=aif-n2", "NodeAddr=10.87.0.12"],
        ["NodeName=aif-n3", "NodeAddr=10.87.0.13"],
    ]  # fmt: skip
    assert all("Gres=gpu:1" in ln and f"RealMemory={memory_mb() // 3}" in ln for ln in lines)
    assert "PartitionName=gpu Nodes=aif-n1,aif-n2,aif-n3 " in text
    gres = [ln for ln in confs["gres.conf"].splitlines() if ln.startswith("NodeName=")]
    assert gres == [f"NodeName=aif-n{i + 1} Name=gpu File={site.dev_dir}/nvidia{i}"
                    for i in range(3)]  # fmt: skip  # each node its own device
    slurm_parts.render(site)
    assert sorted(p.name for p in (site.slurm_dir / "spool").iterdir()) == [
        "aif-n1",
        "aif-n2",
        "aif-n3",
    ]


def test_the_one_node_site_is_rendered_as_before(site: Site) -> None:
    confs = slurm_parts.render_confs(site)
    conf = _conf(confs["slurm.conf"])
    assert conf["SlurmctldHost"] == f"{host()}(127.0.0.1)"
    assert conf["SlurmdSpoolDir"] == f"{site.slurm_dir}/spool" and conf["SlurmdTimeout"] == "60"
    assert f"Name=gpu File={site.dev_dir}/nvidia[0-1]" in confs["gres.conf"].splitlines()


def test_a_stale_munge_link_of_a_site_that_is_gone_is_replaced(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CI's site was killed before its `down`: /run/munge/munge.socket.2 still pointed at
    its socket, and every later `aif site up` on the machine stopped at 'is not ours'."""
    link = tmp_path / "run" / "munge.socket.2"
    link.parent.mkdir()
    monkeypatch.setattr(slurm_parts, "DEFAULT_MUNGE_SOCKET", str(link))
    monkeypatch.setattr(slurm_parts, "munge_default_ok", lambda: False)
    os.symlink("/check/work/main/.aif/site/munge/munge.sock", link)
    slurm_parts.link_default_munge_socket(site)
    assert os.readlink(link) == str(site.munge_socket)
    # A real socket file of a system munged that does not answer is not ours to remove.
    link.unlink()
    link.write_text("")
    with pytest.raises(slurm_parts.SiteError, match="is not ours"):
        slurm_parts.link_default_munge_socket(site)
    assert link.exists() and not link.is_symlink()
