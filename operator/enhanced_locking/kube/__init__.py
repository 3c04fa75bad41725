"""The Kubernetes adapter: CR models, CRDs, and the kopf operator around the lock service.

The core never imports this package; it turns LockPolicy and LockMigration objects into the
provider's ``cluster`` configuration layer and reports back through their status and Events.
"""

from enhanced_locking.kube.lockmigration import LockMigrationSpec, LockMigrationStatus
from enhanced_locking.kube.lockpolicy import LockPolicySpec, LockPolicyStatus
from enhanced_locking.kube.models import GROUP, VERSION
from enhanced_locking.kube.overrides import ResolvedSecrets, cluster_overrides

__all__ = [
    "GROUP",
    "VERSION",
    "LockMigrationSpec",
    "LockMigrationStatus",
    "LockPolicySpec",
    "LockPolicyStatus",
    "ResolvedSecrets",
    "cluster_overrides",
]
