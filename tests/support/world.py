"""A small test world: tenants, groups, users, a policy file, an identity provider."""
from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

from aadrun.config import Settings

TENANT_A = "11111111-1111-1111-1111-111111111111"
TENANT_B = "22222222-2222-2222-2222-222222222222"
TENANT_OTHER = "33333333-3333-3333-3333-333333333333"
G_ENG = "aaaaaaaa-0000-0000-0000-000000000001"
G_STAFF = "aaaaaaaa-0000-0000-0000-000000000002"
G_NEVER = "aaaaaaaa-0000-0000-0000-000000000003"
G_B = "bbbbbbbb-0000-0000-0000-000000000001"
ALICE = "0a11ce00-0000-0000-0000-000000000001"   # in G_ENG
BOB = "0b0b0000-0000-0000-0000-000000000002"     # in no group
CAROL = "0ca401a0-0000-0000-0000-000000000003"   # in G_B (tenant B)

POLICY = textwrap.dedent(f"""\
    tenants:
      - id: {TENANT_A}
        audiences: ["api://aadrun-test"]
        token_versions: [2]
      - id: {TENANT_B}
        audiences: ["api://tenant-b"]
        token_versions: [1, 2]
    principal: "principal://iam.googleapis.com/locations/global/workforcePools/entra/subject/{{oid}}"
    group_principal: "principalSet://iam.googleapis.com/locations/global/workforcePools/entra/group/{{group_id}}"
    services:
      - name: billing
        tenant: {TENANT_A}
        cloud_run: projects/p/locations/europe-west1/services/billing
        audience: api://billing
        access:
          - groups: [{G_ENG}]
          - app_roles: [Billing.Admin]
      - name: roles-only
        tenant: {TENANT_A}
        access:
          - app_roles: [Reports.Read]
      - name: unsynced
        tenant: {TENANT_A}
        access:
          - groups: [{G_NEVER}]
      - name: tenant-b-app
        tenant: {TENANT_B}
        access:
          - groups: [{G_B}]
    """)


def write_policy(folder: Path, text: str = POLICY) -> Path:
    path = folder / "policy.yaml"
    path.write_text(text)
    return path


def settings_for(idp_url: str, policy_path: Path, store_url: str, **overrides) -> Settings:
    return dataclasses.replace(Settings(), authority_url=idp_url, policy_path=str(policy_path),
                               store_url=store_url, **overrides)


def env_for(idp_url: str, policy_path: Path, store_url: str, **extra: str) -> dict[str, str]:
    return {"AADRUN_AUTHORITY_URL": idp_url, "AADRUN_POLICY_PATH": str(policy_path),
            "AADRUN_STORE": store_url, **extra}
