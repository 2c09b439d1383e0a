"""Start-up C's high-risk health project on the site (examples/health-readmission): JSON
Lines with pseudonymised identifiers, its own features and scikit-learn trainer as Slurm
jobs, the sklearn flavour, and promotion only with a named approval."""

from __future__ import annotations

import re

import pytest

from aifactory.tasks.core.config import Profile
from tests.site.conftest import REPO, aif

pytestmark = pytest.mark.site

# On the site, C's declaration waits for its ethics board: this run's approval, by env.
APPROVED = {
    "AIF_STARTUPS__STARTUP_C__DECLARATION__APPROVED_BY": "E. Novak (ethics board) with the DPO",
    "AIF_STARTUPS__STARTUP_C__DECLARATION__APPROVED_ON": "2026-11-20",
}


def test_health_project_on_the_site_needs_a_named_approval(site_profile: Profile) -> None:
    project = str(REPO / "examples" / "health-readmission")
    refused = aif("run", "--profile", "site", "--project", project)
    assert refused.returncode == 5 and "admission.declaration" in refused.stderr, refused

    res = aif("run", "--profile", "site", "--project", project, env=APPROVED)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    uri = res.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"models:/health-readmission/\d+", uri), out[-2000:]
    assert re.search(r"submitted Slurm job \d+ \(aif-train-", out), out[-2000:]

    promote = ["model", "promote", "--profile", "site", "--project", project]
    no_name = aif(*promote, env=APPROVED)
    assert "check FAIL: named approval of a high-risk model" in no_name.stdout, no_name
    named = aif(*promote, "--approved-by", "Dr. E. Novak", env=APPROVED)
    assert "promoted to champion" in named.stdout and "approved by Dr. E. Novak" in named.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(site_profile.mlflow.tracking_uri)
    mv = client.get_model_version_by_alias("health-readmission", "champion")
    assert mv.tags["aif.startup"] == "startup-c" and mv.tags["aif.executor"] == "slurm"
    assert mv.tags["aif.promotion.approved_by"] == "Dr. E. Novak"
    assert "High-risk (EU AI Act, Annex III)" in (mv.description or "")
