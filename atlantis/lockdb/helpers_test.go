package lockdb_test

import (
	"context"
	"testing"
	"time"

	"github.com/runatlantis/enhanced-locking/atlantis/client"
)

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// waitForWaiters waits until key has n requests queued.
func waitForWaiters(t *testing.T, c *client.Client, key string, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		q, err := c.Queue(context.Background(), key)
		must(t, err)
		if len(q.Waiters) >= n {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s never had %d waiters", key, n)
}
