package realatlantis_test

import (
	"context"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/runatlantis/atlantis/server/core/redis"
	"github.com/runatlantis/atlantis/server/events/models"

	"github.com/runatlantis/enhanced-locking/atlantis/client"
	"github.com/runatlantis/enhanced-locking/atlantis/internal/servicetest"
)

// TestAStockAtlantisSeesOnlyTheLegacySide: the one lock space with a stock Atlantis on Redis
// is the service's legacy side, in Atlantis's layout (pr/{key}). A key the service serves on
// its enhanced side (enhanced-locking-enabled, or moved there by a migration) is held under
// the enhanced store's prefix, which Atlantis's own database (what the binary runs) neither
// lists nor checks: Atlantis grants that key to another pull while the service holds it.
// docs/07-atlantis-go.md says the lock space is shared for legacy keys only.
func TestAStockAtlantisSeesOnlyTheLegacySide(t *testing.T) {
	redisAddr := servicetest.Redis(t)
	svc := servicetest.Serve(t, append(servicetest.RedisArgs(redisAddr), "--enhanced-locking-enabled")...)
	c, err := client.New(svc.URL)
	must(t, err)
	host, port, _ := net.SplitHostPort(redisAddr)
	portNum, _ := strconv.Atoi(port)
	atlantisDB, err := redis.New(host, portNum, "", false, false, 0)
	must(t, err)
	defer atlantisDB.Close() //nolint:errcheck

	held, err := c.Acquire(context.Background(), client.AcquireRequest{
		Project:   client.Project{RepoFullName: "acme/infra", Path: "envs/prod", ProjectName: "prod"},
		Workspace: "default", Pull: client.Pull{Num: 12}, User: client.User{Username: "alice"},
	})
	must(t, err)
	if held.Backend != "enhanced" {
		t.Fatalf("with enhanced locking on the lock should be on the enhanced side, got %+v", held)
	}
	listed, err := atlantisDB.List()
	must(t, err)
	if len(listed) != 0 {
		t.Fatalf("Atlantis's database should not see the enhanced side's lock, lists %+v", listed)
	}
	granted, _, err := atlantisDB.TryLock(models.ProjectLock{
		Project: models.NewProject("acme/infra", "envs/prod", "prod"), Workspace: "default",
		Pull: models.PullRequest{Num: 13}, User: models.User{Username: "bob"}, Time: time.Now()})
	must(t, err)
	if !granted {
		t.Fatal("Atlantis's database should grant the key it cannot see held")
	}

	// The other way round the service looks: a lock Atlantis holds refuses its callers.
	written := models.ProjectLock{Project: models.NewProject("acme/infra", "envs/dev", "dev"),
		Workspace: "default", Pull: models.PullRequest{Num: 30}, User: models.User{Username: "carol"},
		Time: time.Now()}
	granted, _, err = atlantisDB.TryLock(written)
	must(t, err)
	if !granted {
		t.Fatal("Atlantis's database should write the free key's lock")
	}
	_, err = c.Acquire(context.Background(), client.AcquireRequest{
		Project:   client.Project{RepoFullName: "acme/infra", Path: "envs/dev", ProjectName: "dev"},
		Workspace: "default", Pull: client.Pull{Num: 31}, User: client.User{Username: "dave"},
	})
	var refused *client.HeldError
	if !errorsAs(err, &refused) || refused.Holder == nil || refused.Holder.Pull.Num != 30 {
		t.Fatalf("the service should refuse pull 31 the key Atlantis's pull 30 holds, got %v", err)
	}
}
