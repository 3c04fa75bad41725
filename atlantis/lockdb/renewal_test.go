package lockdb_test

import (
	"context"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/runatlantis/atlantis/server/core/locking"
	"github.com/runatlantis/atlantis/server/events/command"
	"github.com/runatlantis/atlantis/server/events/models"

	"github.com/runatlantis/enhanced-locking/atlantis/client"
	"github.com/runatlantis/enhanced-locking/atlantis/internal/servicetest"
	"github.com/runatlantis/enhanced-locking/atlantis/lockdb"
)

// refreshRefused is a reverse proxy on loopback in front of the service that passes every
// call on but a lease renewal (POST /v1/locks/refresh), which it answers 503 itself, as a
// proxy whose upstream went away between two calls; it counts the renewals it was sent.
func refreshRefused(t *testing.T, serviceURL string) (string, *atomic.Int32) {
	t.Helper()
	var refreshes atomic.Int32
	through := servicetest.Proxy(t, serviceURL, 0, func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method == http.MethodPost && r.URL.Path == "/v1/locks/refresh" {
			refreshes.Add(1)
			http.Error(w, "no upstream ready", http.StatusServiceUnavailable)
			return true
		}
		return false
	})
	return through, &refreshes
}

func TestATryLockThatAnswersAnErrorLeavesTheLocksAsTheyWere(t *testing.T) {
	// Atlantis reads an error from TryLock as "not locked": the plan or apply fails with
	// "acquiring lock: ..." and nothing unlocks (project_command_runner.go, doPlan, doApply),
	// as its own databases change nothing on a TryLock that fails. With lock-ttl set, the
	// adapter renews the lease of a lock the pull held already (its apply after its plan); a
	// renewal that fails must then leave that lock as it was, the pull's, with its lease. A
	// fresh grant has its whole lease: it is not renewed, so no renewal can fail after it and
	// leave held a lock Atlantis was told it did not get.
	forEachStore(t, func(t *testing.T, s store) {
		svc := s.serve(t, "--enhanced-locking-enabled", "--enhanced-locking-lock-ttl", "2h")
		through, refreshes := refreshRefused(t, svc.URL)
		database, err := lockdb.New(through, open(t, svc).Wrapped(),
			lockdb.WithClientOptions(client.WithRetries(2, 10*time.Millisecond)))
		must(t, err)
		direct := open(t, svc).Client()
		ctx := context.Background()

		// A fresh grant: granted with its whole lease, no renewal asked.
		fresh := models.NewProject("acme/infra", "envs/dev", "dev")
		got, err := locking.NewClient(database).TryLock(fresh, "default", pullOf("acme/infra", 2), alice)
		if err != nil || !got.LockAcquired {
			t.Fatalf("a fresh grant should be granted, got %+v %v", got, err)
		}
		held, err := direct.Get(ctx, client.LockKey(client.Project{RepoFullName: "acme/infra",
			Path: "envs/dev", ProjectName: "dev"}, "default"))
		must(t, err)
		if held == nil || held.Pull.Num != 2 || held.ExpiresAt == nil ||
			time.Until(*held.ExpiresAt) < 119*time.Minute {
			t.Fatalf("the fresh grant should be pull 2's with lock-ttl's lease, got %+v", held)
		}
		if n := refreshes.Load(); n != 0 {
			t.Fatalf("a fresh grant has its whole lease: no renewal should be sent, %d were", n)
		}

		// The pull's own lock asked again (its apply): the renewal fails; an error, and the
		// lock stays as it was.
		planned, err := direct.Acquire(ctx, client.AcquireRequest{
			Project:   client.Project{RepoFullName: "acme/infra", Path: "envs/prod", ProjectName: "prod"},
			Workspace: "default", Pull: client.Pull{Num: 1}, User: client.User{Username: "alice"},
			TTL: time.Minute})
		must(t, err)
		ok, _, err := database.ForCommand(command.Apply).TryLock(models.ProjectLock{
			Project: models.NewProject("acme/infra", "envs/prod", "prod"), Workspace: "default",
			Pull: pullOf("acme/infra", 1), User: alice, Time: time.Now()})
		if ok || err == nil || !client.IsUnavailable(err) {
			t.Fatalf("a renewal that failed should be an unavailable error, got %v %v", ok, err)
		}
		if refreshes.Load() == 0 {
			t.Fatal("the pull's own lock asked again should have been renewed")
		}
		after, err := direct.Get(ctx, planned.Key)
		must(t, err)
		if after == nil || after.FencingToken != planned.FencingToken || after.ExpiresAt == nil ||
			!after.ExpiresAt.Equal(*planned.ExpiresAt) {
			t.Fatalf("the pull's lock should be as it was (token %d, lease to %v), got %+v",
				planned.FencingToken, planned.ExpiresAt, after)
		}
	})
}
