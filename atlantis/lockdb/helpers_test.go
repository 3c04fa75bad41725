package lockdb_test

import (
	"context"
	"testing"
	"time"

	"github.com/runatlantis/atlantis/server/core/locking"
	"github.com/runatlantis/atlantis/server/events"
	"github.com/runatlantis/atlantis/server/events/models"
	"github.com/runatlantis/atlantis/server/events/vcs"

	"github.com/runatlantis/enhanced-locking/atlantis/client"
	"github.com/runatlantis/enhanced-locking/atlantis/lockdb"
)

// projectLocker is Atlantis's project locker (what its plan and apply ask) over database,
// linking pulls through vcsClient.
func projectLocker(database *lockdb.Database, vcsClient vcs.Client) *events.DefaultProjectLocker {
	return &events.DefaultProjectLocker{
		Locker:         locking.NewClient(database),
		NoOpLocker:     locking.NewNoOpLocker(),
		VCSClient:      vcsClient,
		ExecutableName: "atlantis",
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// waitForWaiters waits until key has n requests queued, and answers its queue then.
func waitForWaiters(t *testing.T, c *client.Client, key string, n int) *client.Queue {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		q, err := c.Queue(context.Background(), key)
		must(t, err)
		if len(q.Waiters) >= n {
			return q
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s never had %d waiters", key, n)
	return nil
}

// stillHeldBy fails t unless pull num of repo holds project's lock in workspace default.
func stillHeldBy(t *testing.T, database *lockdb.Database, project models.Project, repo string, num int) {
	t.Helper()
	kept, err := database.GetLock(project, "default")
	must(t, err)
	if kept == nil || kept.Project.RepoFullName != repo || kept.Pull.Num != num {
		t.Fatalf("%s !%d should still hold the lock, got %+v", repo, num, kept)
	}
}
