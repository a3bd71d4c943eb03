"""train.platform.configure_cpu: XLA flags added once, before start-up, never over the user's."""

from __future__ import annotations

import os

import pytest

from train import platform


@pytest.fixture
def not_started(monkeypatch):
    monkeypatch.setattr(platform, "_backends_started", lambda: False)
    monkeypatch.setattr(platform, "flags_apply", lambda: True)


def test_adds_flags_to_existing(monkeypatch, not_started):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert platform.configure_cpu()
    flags = os.environ["XLA_FLAGS"].split()
    assert flags[0] == "--xla_force_host_platform_device_count=8"
    assert set(platform.CPU_XLA_FLAGS) <= set(flags)
    assert platform.configure_cpu()  # idempotent
    assert os.environ["XLA_FLAGS"].split() == flags


def test_user_setting_wins(monkeypatch, not_started):
    own = "--xla_cpu_experimental_ynn_fusion_type=+LIBRARY_FUSION_TYPE_ELTWISE"
    monkeypatch.setenv("XLA_FLAGS", own)
    assert not platform.configure_cpu()
    assert os.environ["XLA_FLAGS"] == own


def test_too_late_changes_nothing(monkeypatch):
    monkeypatch.setattr(platform, "_backends_started", lambda: True)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert not platform.configure_cpu()
    assert "XLA_FLAGS" not in os.environ


def test_only_on_verified_cpu_hosts(monkeypatch):
    monkeypatch.setattr(platform, "_backends_started", lambda: False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert not platform.flags_apply()
    assert not platform.configure_cpu() and "XLA_FLAGS" not in os.environ
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setattr(platform, "_ACCELERATOR_PLUGINS", ("json",))  # an importable module
    assert not platform.flags_apply()
    monkeypatch.setattr(platform, "_ACCELERATOR_PLUGINS", ())
    monkeypatch.setattr(platform, "_VERIFIED_JAXLIB", ("0.0.",))
    assert not platform.flags_apply()
