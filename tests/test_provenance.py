"""What every measurement records about where it was taken."""

from __future__ import annotations

import subprocess

from freekv_sglang import provenance


def test_commit_is_the_checkouts_head_or_the_given_one():
    assert provenance.commit_id("abc1234") == "abc1234"
    head = subprocess.run(["git", "-C", provenance.ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode == 0:  # a source checkout (CI clones one)
        assert provenance.commit_id().split("+")[0] == head.stdout.strip()


def test_outside_a_checkout_the_commit_is_said_unknown(monkeypatch, tmp_path):
    monkeypatch.setattr(provenance, "ROOT", str(tmp_path))
    assert provenance.commit_id().startswith("unknown")


def test_versions_name_every_package_and_host_its_size():
    v = provenance.versions()
    assert set(v) == set(provenance.PACKAGES) and v["torch"]
    h = provenance.host()
    assert h["cpus"] >= 1 and h["ram_gib"] > 0
