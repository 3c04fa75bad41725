package client_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/runatlantis/enhanced-locking/atlantis/client"
	"github.com/runatlantis/enhanced-locking/atlantis/internal/servicetest"
)

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func request(repo, path string, pull int) client.AcquireRequest {
	return client.AcquireRequest{
		Project: client.Project{RepoFullName: repo, Path: path},
		Pull:    client.Pull{Num: pull, URL: "https://github.com/" + repo + "/pull/1"},
		User:    client.User{Username: "alice", Teams: []string{"sre"}},
	}
}

// enhanced is a service whose enhanced locker answers (queues, leases, priorities).
func enhanced(t *testing.T) *client.Client {
	t.Helper()
	svc := servicetest.Serve(t, "--enhanced-locking-enabled", "--enhanced-locking-priority-queue")
	c, err := client.New(svc.URL, client.WithToken("s3cret-token"))
	must(t, err)
	return c
}

func TestAcquireReleaseAndTypedRefusals(t *testing.T) {
	c := enhanced(t)
	ctx := context.Background()
	lock, err := c.Acquire(ctx, request("acme/infra", "envs/prod/", 1))
	must(t, err)
	if lock.Key != "acme/infra/envs/prod/default/" || lock.Key != client.LockKey(lock.Project, "default") {
		t.Fatalf("the key should be Atlantis's from the cleaned path, got %q", lock.Key)
	}
	if lock.FencingToken <= 0 || lock.Backend != "enhanced" || lock.User.Teams[0] != "sre" {
		t.Fatalf("unexpected lock: %+v", lock)
	}

	_, err = c.Acquire(ctx, request("acme/infra", "./envs/prod", 2))
	var held *client.HeldError
	if !errors.As(err, &held) || held.Reason != client.ReasonHeld || held.Holder == nil || held.Holder.Pull.Num != 1 {
		t.Fatalf("pull 2 should get a HeldError naming pull 1, got %v", err)
	}
	if !client.IsHeld(err) || client.IsUnavailable(err) {
		t.Fatalf("IsHeld/IsUnavailable disagree with %v", err)
	}

	_, err = c.ReleaseIfOwned(ctx, lock.Key, 2)
	var notOwner *client.NotOwnerError
	if !errors.As(err, &notOwner) || notOwner.Holder.Pull.Num != 1 || notOwner.Key != lock.Key {
		t.Fatalf("pull 2 releasing pull 1's lock should get NotOwnerError, got %v", err)
	}

	req := request("acme/infra", "envs/prod", 3)
	req.Wait = time.Hour * 24 * 365
	_, err = c.Acquire(ctx, req)
	var invalid *client.InvalidError
	if !errors.As(err, &invalid) || invalid.Field != "wait" || invalid.Status != 422 {
		t.Fatalf("a wait above max-timeout should be an InvalidError on wait, got %v", err)
	}

	got, err := c.Get(ctx, lock.Key)
	must(t, err)
	if got == nil || got.FencingToken != lock.FencingToken {
		t.Fatalf("Get should answer the held lock, got %+v", got)
	}
	freed, err := c.ReleaseIfOwned(ctx, lock.Key, 1)
	must(t, err)
	if freed == nil || freed.Pull.Num != 1 {
		t.Fatalf("pull 1 should free its lock, got %+v", freed)
	}
	again, err := c.ReleaseIfOwned(ctx, lock.Key, 1)
	if err != nil || again != nil {
		t.Fatalf("a free key answers nil, got %+v %v", again, err)
	}
	none, err := c.Get(ctx, lock.Key)
	if err != nil || none != nil {
		t.Fatalf("a free key answers nil, got %+v %v", none, err)
	}
}

func TestReleaseIfOwnedInLeavesAnotherRepositorysLockOfTheSameKey(t *testing.T) {
	// gl/grp + sub/proj and gl/grp/sub + proj join to one key; both can have pull 5.
	c := enhanced(t)
	ctx := context.Background()
	lock, err := c.Acquire(ctx, request("gl/grp", "sub/proj", 5))
	must(t, err)
	_, err = c.ReleaseIfOwnedIn(ctx, lock.Key, "gl/grp/sub", 5)
	var notOwner *client.NotOwnerError
	if !errors.As(err, &notOwner) || notOwner.Holder.Project.RepoFullName != "gl/grp" || notOwner.Key != lock.Key {
		t.Fatalf("pull 5 of gl/grp/sub releasing gl/grp's lock should get NotOwnerError, got %v", err)
	}
	kept, err := c.Get(ctx, lock.Key)
	must(t, err)
	if kept == nil || kept.FencingToken != lock.FencingToken {
		t.Fatalf("gl/grp's lock should stay held, got %+v", kept)
	}
	freed, err := c.ReleaseIfOwnedIn(ctx, lock.Key, "gl/grp", 5)
	must(t, err)
	if freed == nil || freed.Project.RepoFullName != "gl/grp" || freed.Pull.Num != 5 {
		t.Fatalf("pull 5 of gl/grp should free its lock, got %+v", freed)
	}
}

// leased is the lock r asks for, granted with a lease of a minute.
func leased(t *testing.T, c *client.Client, r client.AcquireRequest) *client.Lock {
	t.Helper()
	r.TTL = time.Minute
	lock, err := c.Acquire(context.Background(), r)
	must(t, err)
	return lock
}

func TestRefreshAndReleaseBatchLeaveAnotherRepositorysLockOfTheSameKey(t *testing.T) {
	// gl/grp + sub/proj and gl/grp/sub + proj join to one key; both can have pull 5: the
	// repository each call sends keeps gl/grp/sub's pull 5 off gl/grp's lock.
	c := enhanced(t)
	ctx := context.Background()
	lock := leased(t, c, request("gl/grp", "sub/proj", 5))
	five := 5
	_, refreshErr := c.Refresh(ctx, lock.Key, "gl/grp/sub", 5, time.Hour)
	_, releaseErr := c.ReleaseBatch(ctx, []string{lock.Key}, "gl/grp/sub", &five)
	for _, err := range []error{refreshErr, releaseErr} {
		var notOwner *client.NotOwnerError
		if !errors.As(err, &notOwner) || notOwner.Holder.Project.RepoFullName != "gl/grp" || notOwner.Key != lock.Key {
			t.Fatalf("pull 5 of gl/grp/sub on gl/grp's lock should get NotOwnerError, got %v", err)
		}
	}
	kept, err := c.Get(ctx, lock.Key)
	must(t, err)
	if kept == nil || kept.FencingToken != lock.FencingToken || !kept.ExpiresAt.Equal(*lock.ExpiresAt) {
		t.Fatalf("gl/grp's lock should stay held with its lease, got %+v", kept)
	}
	refreshed, err := c.Refresh(ctx, lock.Key, "gl/grp", 5, time.Hour)
	must(t, err)
	if refreshed == nil || !refreshed.ExpiresAt.After(lock.ExpiresAt.Add(50*time.Minute)) {
		t.Fatalf("pull 5 of gl/grp should refresh its lock, got %+v", refreshed)
	}
	out, err := c.ReleaseBatch(ctx, []string{lock.Key}, "gl/grp", &five)
	must(t, err)
	if len(out.Released) != 1 || out.Released[0].Project.RepoFullName != "gl/grp" {
		t.Fatalf("pull 5 of gl/grp should free its lock, got %+v", out)
	}
}

// batchOf is pull's batch of the acme/infra projects at paths, asked by alice.
func batchOf(pull int, paths ...string) client.BatchRequest {
	r := client.BatchRequest{Pull: client.Pull{Num: pull}, User: client.User{Username: "alice"}}
	for _, path := range paths {
		r.Locks = append(r.Locks, client.BatchItem{
			Project: client.Project{RepoFullName: "acme/infra", Path: path}})
	}
	return r
}

func TestListByPullBatchAndForceUnlock(t *testing.T) {
	c := enhanced(t)
	ctx := context.Background()
	locks, err := c.AcquireBatch(ctx, batchOf(7, "a", "b"))
	must(t, err)
	if len(locks) != 2 || locks[0].Grant != client.GrantNew || locks[1].Grant != client.GrantNew {
		t.Fatalf("the batch should hold both, each granted by it, got %+v", locks)
	}
	again, err := c.AcquireBatch(ctx, batchOf(7, "d", "a"))
	must(t, err)
	if len(again) != 2 || again[0].Grant != client.GrantNew || again[1].Grant != client.GrantAgain {
		t.Fatalf("d is granted by the batch, a was pull 7's already: got %+v", again)
	}
	seven := 7
	if out, err := c.ReleaseBatch(ctx, []string{again[0].Key}, "acme/infra", &seven); err != nil ||
		len(out.Released) != 1 {
		t.Fatalf("pull 7 should free d, got %+v, %v", out, err)
	}
	_, err = c.AcquireBatch(ctx, batchOf(8, "c", "b"))
	var held *client.HeldError
	if !errors.As(err, &held) || held.Key != "acme/infra/b/default/" {
		t.Fatalf("pull 8's batch should be refused on b, got %v", err)
	}
	if free, _ := c.Get(ctx, "acme/infra/c/default/"); free != nil {
		t.Fatal("a refused batch holds none of its keys")
	}
	listed, err := c.List(ctx, client.ListFilter{Repo: "acme/infra", Pull: &seven})
	must(t, err)
	if len(listed) != 2 {
		t.Fatalf("List(acme/infra, 7) should give 2, got %+v", listed)
	}
	forced, err := c.ForceUnlock(ctx, "acme/infra/a/default/", "")
	must(t, err)
	if forced == nil || forced.Pull.Num != 7 {
		t.Fatalf("force-unlock should free pull 7's lock, got %+v", forced)
	}
	released, err := c.ReleasePull(ctx, "acme/infra", 7)
	must(t, err)
	if len(released) != 1 || released[0].Key != "acme/infra/b/default/" {
		t.Fatalf("ReleasePull should free the one left, got %+v", released)
	}
	out, err := c.ReleaseBatch(ctx, []string{"acme/infra/a/default/"}, "", nil)
	must(t, err)
	if len(out.Released) != 0 || len(out.NotHeld) != 1 {
		t.Fatalf("releasing a free key: %+v", out)
	}
}

func TestADeadlockNamesItsCycleOwnerByOwner(t *testing.T) {
	svc := servicetest.Serve(t, "--enhanced-locking-enabled", "--enhanced-locking-deadlock-detection")
	c, err := client.New(svc.URL)
	must(t, err)
	ctx := context.Background()
	_, err = c.Acquire(ctx, request("acme/infra", "a", 1))
	must(t, err)
	_, err = c.Acquire(ctx, request("acme/infra", "b", 2))
	must(t, err)
	waiting := make(chan error, 1)
	go func() {
		first := request("acme/infra", "b", 1)
		first.Wait = 20 * time.Second
		_, err := c.Acquire(ctx, first)
		waiting <- err
	}()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		queue, err := c.Queue(ctx, "acme/infra/b/default/")
		must(t, err)
		if len(queue.Waiters) == 1 {
			break // pull 1 waits for b
		}
		if time.Now().After(deadline) {
			t.Fatal("pull 1's wait for b was never queued")
		}
	}
	closing := request("acme/infra", "a", 2)
	closing.Wait = 20 * time.Second
	_, err = c.Acquire(ctx, closing)
	var held *client.HeldError
	if !errors.As(err, &held) || held.Reason != client.ReasonDeadlock {
		t.Fatalf("pull 2 waiting for a should close a cycle, got %v", err)
	}
	want := []client.CycleOwner{{Name: "acme/infra#2", Repo: "acme/infra", Pull: 2},
		{Name: "acme/infra#1", Repo: "acme/infra", Pull: 1}, {Name: "acme/infra#2", Repo: "acme/infra", Pull: 2}}
	if len(held.CycleOwners) != len(want) || held.HiddenOwners != 0 {
		t.Fatalf("the cycle should be %+v with nothing hidden, got %+v (%d hidden)", want, held.CycleOwners, held.HiddenOwners)
	}
	for i, owner := range want {
		if held.CycleOwners[i] != owner || held.Cycle[i] != owner.Name {
			t.Fatalf("owner %d should be %+v, got %+v (%q)", i, owner, held.CycleOwners[i], held.Cycle[i])
		}
	}
	_, err = c.ReleaseIfOwned(ctx, "acme/infra/b/default/", 2)
	must(t, err)
	must(t, <-waiting)
}

func TestRefreshExtendsALease(t *testing.T) {
	c := enhanced(t)
	ctx := context.Background()
	lock := leased(t, c, request("acme/infra", "envs/prod", 1))
	if lock.ExpiresAt == nil {
		t.Fatal("a lock with a TTL has an expiry")
	}
	refreshed, err := c.Refresh(ctx, lock.Key, "acme/infra", 1, time.Hour)
	must(t, err)
	if refreshed == nil || refreshed.ExpiresAt == nil || !refreshed.ExpiresAt.After(lock.ExpiresAt.Add(50*time.Minute)) {
		t.Fatalf("refresh should move the expiry an hour out, got %+v", refreshed)
	}
	_, err = c.Refresh(ctx, lock.Key, "acme/infra", 2, time.Hour)
	var notOwner *client.NotOwnerError
	if !errors.As(err, &notOwner) {
		t.Fatalf("another pull refreshing should get NotOwnerError, got %v", err)
	}
}

func TestWaitersQueueInPriorityOrderAndCanBeCancelled(t *testing.T) {
	c := enhanced(t)
	ctx := context.Background()
	holder, err := c.Acquire(ctx, request("acme/infra", "envs/prod", 1))
	must(t, err)
	var wg sync.WaitGroup
	results := make(map[string]error)
	var mu sync.Mutex
	wait := func(id string, pull int, p client.Priority) {
		defer wg.Done()
		req := request("acme/infra", "envs/prod", pull)
		req.Wait, req.Priority, req.RequestID = 20*time.Second, p, id
		_, err := c.Acquire(ctx, req)
		mu.Lock()
		results[id] = err
		mu.Unlock()
	}
	wg.Add(2)
	go wait("plan-2", 2, client.PriorityNormal)
	waitFor(t, c, holder.Key, 1)
	go wait("apply-3", 3, client.PriorityHigh)
	q := waitFor(t, c, holder.Key, 2)
	if q.Holder == nil || q.Holder.Pull.Num != 1 || q.Waiters[0].RequestID != "apply-3" || q.Waiters[1].RequestID != "plan-2" {
		t.Fatalf("the high-priority waiter should be first: %+v", q)
	}
	cancelled, err := c.Cancel(ctx, holder.Key, "plan-2")
	must(t, err)
	if !cancelled {
		t.Fatal("plan-2 was queued: cancel should find it")
	}
	gone, err := c.Cancel(ctx, holder.Key, "plan-2")
	if err != nil || gone {
		t.Fatalf("cancelling twice: %v %v", gone, err)
	}
	_, err = c.ReleaseIfOwned(ctx, holder.Key, 1)
	must(t, err)
	wg.Wait()
	var held *client.HeldError
	if !errors.As(results["plan-2"], &held) || held.Reason != client.ReasonCancelled {
		t.Fatalf("the cancelled waiter should be told so, got %v", results["plan-2"])
	}
	if results["apply-3"] != nil {
		t.Fatalf("apply-3 should be granted when pull 1 lets go, got %v", results["apply-3"])
	}
}

func waitFor(t *testing.T, c *client.Client, key string, n int) *client.Queue {
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

func TestEventsStreamAndResumeAfterTheLastEvent(t *testing.T) {
	c := enhanced(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream, err := c.Events(ctx, client.EventFilter{Repo: "acme/events"})
	must(t, err)
	lock, err := c.Acquire(ctx, request("acme/events", "x", 1))
	must(t, err)
	first, err := stream.Next()
	must(t, err)
	if first.Type != "acquired" || first.Key != lock.Key || first.ID == "" || first.Lock == nil || first.Lock.Pull.Num != 1 {
		t.Fatalf("the first event should be the acquire of %s, got %+v", lock.Key, first)
	}
	must(t, stream.Close())

	// Events after the stream closed are replayed to a stream that resumes after `first`.
	_, err = c.ReleaseIfOwned(ctx, lock.Key, 1)
	must(t, err)
	_, err = c.Acquire(ctx, request("acme/events", "x", 2))
	must(t, err)
	resumed, err := c.Events(ctx, client.EventFilter{Repo: "acme/events", LastEventID: first.ID})
	must(t, err)
	defer resumed.Close() //nolint:errcheck
	var types []string
	for len(types) < 2 {
		ev, err := resumed.Next()
		must(t, err)
		types = append(types, ev.Type)
	}
	if strings.Join(types, ",") != "released,acquired" {
		t.Fatalf("resuming after the first event should replay released, acquired; got %v", types)
	}

	_, err = c.Events(ctx, client.EventFilter{Types: []string{"no-such-type"}})
	var invalid *client.InvalidError
	if !errors.As(err, &invalid) || invalid.Field != "type" {
		t.Fatalf("an unknown event type is an InvalidError on type, got %v", err)
	}
}

func TestAnUnreachableServiceIsUnavailableAfterRetriesAndNeverShowsTheToken(t *testing.T) {
	port := servicetest.FreePort(t) // nothing listens there
	// A refused connection is tried again for the call's time (here 1s), not three times.
	c, err := client.New("http://127.0.0.1:"+itoa(port), client.WithToken("s3cret-token"),
		client.WithRetries(3, 50*time.Millisecond), client.WithCallTimeout(time.Second))
	must(t, err)
	started := time.Now()
	_, err = c.List(context.Background(), client.ListFilter{})
	var unavailable *client.UnavailableError
	if !errors.As(err, &unavailable) || unavailable.Op != "list" {
		t.Fatalf("List should be unavailable, got %v", err)
	}
	if strings.Contains(err.Error(), "s3cret") {
		t.Fatalf("the token leaked into an error: %v", err)
	}
	if elapsed := time.Since(started); elapsed > 5*time.Second {
		t.Fatalf("tries within a call's 1s with a 50ms backoff took %v", elapsed)
	}
	// A release that names no pull is sent again only because no connection could be made;
	// with none made at all, it still fails closed.
	if _, err := c.Release(context.Background(), "acme/infra/./default/"); !client.IsUnavailable(err) {
		t.Fatalf("Release should be unavailable, got %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := c.Get(ctx, "k"); !errors.Is(err, context.Canceled) {
		t.Fatalf("a cancelled context should show through, got %v", err)
	}
	if _, err := client.New("not a url"); err == nil {
		t.Fatal("a base URL that is not http(s) should be refused")
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

func TestTheBearerTokenIsWhoTheServiceSees(t *testing.T) {
	svc := servicetest.Serve(t, servicetest.StaticAccess([]string{"viewer-token,viewer,2"},
		"viewer=user:viewer")...)
	ctx := context.Background()
	as := func(token string) *client.Client {
		opts := []client.Option{}
		if token != "" {
			opts = append(opts, client.WithToken(token))
		}
		c, err := client.New(svc.URL, opts...)
		must(t, err)
		return c
	}
	lock, err := as(servicetest.AtlantisToken).Acquire(ctx, request("acme/infra", "envs/prod", 1))
	must(t, err)
	var denied *client.DeniedError
	if _, err := as("").Acquire(ctx, request("acme/infra", "envs/dev", 1)); !errors.As(err, &denied) || denied.Status != 401 {
		t.Fatalf("no token: want a 401 DeniedError, got %v", err)
	}
	_, unknown := as("wrong-token").List(ctx, client.ListFilter{})
	if !errors.As(unknown, &denied) || denied.Status != 401 {
		t.Fatalf("an unknown token: want a 401 DeniedError, got %v", unknown)
	}
	// Atlantis shows a lock call's error in the pull request's comment: a 401 says where the
	// client's token comes from, never the token.
	if said := fmtErr(unknown); !strings.Contains(said, "client.WithToken") ||
		!strings.Contains(said, "client.WithTokenFile") || strings.Contains(said, "wrong-token") {
		t.Fatalf("a 401 should say how to give the client its token, got %q", said)
	}
	if _, err := as("viewer-token").Acquire(ctx, request("acme/infra", "envs/dev", 2)); !errors.As(err, &denied) || denied.Status != 403 {
		t.Fatalf("a viewer acquiring: want a 403 DeniedError, got %v", err)
	}
	if strings.Contains(fmtErr(err), "viewer-token") {
		t.Fatalf("the token shows in the error: %v", err)
	}
	listed, err := as("viewer-token").List(ctx, client.ListFilter{})
	must(t, err)
	if len(listed) != 1 || listed[0].Key != lock.Key {
		t.Fatalf("a viewer reads the locks: %+v", listed)
	}
}

func fmtErr(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// proxy is a reverse proxy on loopback in front of the service, as one runs in front of it
// in a cluster, that counts the acquires it is sent. The first `refuse` of them it answers
// 503 itself (no upstream ready), without passing them on; it gives up on the service
// after `patience` (answering 502, as a proxy whose upstream timed out).
func proxy(t *testing.T, serviceURL string, refuse int, patience time.Duration) (string, *atomic.Int32) {
	t.Helper()
	var acquires atomic.Int32
	through := servicetest.Proxy(t, serviceURL, patience, func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method == http.MethodPost && r.URL.Path == "/v1/locks" {
			if n := acquires.Add(1); int(n) <= refuse {
				http.Error(w, "no upstream ready", http.StatusServiceUnavailable)
				return true
			}
		}
		return false
	})
	return through, &acquires
}

func TestAnAcquireIsNotSentAgainAfterTheProxyGaveUpOnTheService(t *testing.T) {
	// Pull 2 waits behind pull 1; the proxy gives up on the service first (502). The service
	// may have granted the acquire by then and will give the grant back (its caller is gone):
	// a retry answered with that same lock would be told it holds what the give-back frees.
	// So the acquire is not sent again: the caller hears the service was unavailable.
	svc := servicetest.Serve(t, "--enhanced-locking-enabled", "--enhanced-locking-priority-queue")
	direct, err := client.New(svc.URL)
	must(t, err)
	ctx := context.Background()
	first, err := direct.Acquire(ctx, request("acme/infra", "envs/prod", 1))
	must(t, err)
	through, acquires := proxy(t, svc.URL, 0, 500*time.Millisecond)
	c, err := client.New(through, client.WithRetries(3, 10*time.Millisecond))
	must(t, err)
	waiting := request("acme/infra", "envs/prod", 2)
	waiting.Wait = 20 * time.Second
	_, err = c.Acquire(ctx, waiting)
	var unavailable *client.UnavailableError
	if !errors.As(err, &unavailable) || unavailable.Status != http.StatusBadGateway {
		t.Fatalf("the acquire should answer the proxy's 502 as unavailable, got %v", err)
	}
	if n := acquires.Load(); n != 1 {
		t.Fatalf("an acquire the service may have acted on must be sent once, sent %d times", n)
	}
	// The service dropped the wait of the caller that went away: pull 1's release leaves the
	// key free, not held by pull 2, which was never told it got it.
	deadline := time.Now().Add(10 * time.Second)
	for {
		q, err := direct.Queue(ctx, first.Key)
		must(t, err)
		if len(q.Waiters) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the gone caller's wait is still queued: %+v", q.Waiters)
		}
		time.Sleep(20 * time.Millisecond)
	}
	_, err = direct.ReleaseIfOwned(ctx, first.Key, 1)
	must(t, err)
	if held, err := direct.Get(ctx, first.Key); err != nil || held != nil {
		t.Fatalf("the key should be free, got %+v, %v", held, err)
	}
}

// shedding is a service of one request in flight at most, taken by pull 2's wait behind
// pull 1's lock: every other call is shed (503, reason "overloaded", Retry-After: 1) until
// pull 1's release (a DELETE is always served) ends the wait. It answers the service, a
// client of it without retries, pull 1's lock and the wait's end.
func shedding(t *testing.T) (*servicetest.Service, *client.Client, *client.Lock, chan error) {
	t.Helper()
	svc := servicetest.Serve(t, "--enhanced-locking-enabled", "--enhanced-locking-priority-queue",
		"--enhanced-locking-http-max-in-flight", "1")
	direct, err := client.New(svc.URL, client.WithRetries(1, 0))
	must(t, err)
	ctx := context.Background()
	first, err := direct.Acquire(ctx, request("acme/infra", "envs/prod", 1))
	must(t, err)
	waiting := request("acme/infra", "envs/prod", 2)
	waiting.Wait = 20 * time.Second
	waited := make(chan error, 1)
	go func() { _, err := direct.Acquire(ctx, waiting); waited <- err }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := direct.Get(ctx, first.Key); client.IsUnavailable(err) {
			return svc, direct, first, waited // pull 2's wait is the request in flight
		}
		if time.Now().After(deadline) {
			t.Fatal("the service never shed a request beyond its limit of one in flight")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestAnAcquireTheServiceShedBeforeAnyWorkIsSentAgain(t *testing.T) {
	// Pull 3's acquire is shed until pull 1's release ends pull 2's wait, then granted.
	svc, direct, first, waited := shedding(t)
	ctx := context.Background()
	deadline := time.Now().Add(10 * time.Second)
	through, acquires := proxy(t, svc.URL, 0, 10*time.Second)
	c, err := client.New(through, client.WithRetries(50, 10*time.Millisecond))
	must(t, err)
	type outcome struct {
		lock *client.Lock
		err  error
	}
	third := make(chan outcome, 1)
	go func() {
		lock, err := c.Acquire(ctx, request("acme/infra", "envs/dev", 3))
		third <- outcome{lock, err}
	}()
	for acquires.Load() < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("pull 3's acquire was sent %d times while shed, want it sent again", acquires.Load())
		}
		time.Sleep(5 * time.Millisecond)
	}
	_, err = direct.ReleaseIfOwned(ctx, first.Key, 1)
	must(t, err)
	must(t, <-waited)
	got := <-third
	must(t, got.err)
	if n := acquires.Load(); n < 3 || got.lock.Pull.Num != 3 {
		t.Fatalf("shed twice or more, then the grant: got %d attempts and %+v", n, got.lock)
	}
}

func TestAShedCallWaitsTheRetryAfterWithinItsContext(t *testing.T) {
	// One request in flight at most, taken by pull 2's wait: every other call is shed (503,
	// reason "overloaded", Retry-After: 1). A retry waits that second, however short the
	// client's own backoff, and a call whose context ends before the next try could be made
	// answers the service's 503 at once.
	svc, direct, first, waited := shedding(t)
	ctx := context.Background()
	t.Cleanup(func() {
		_, err := direct.ReleaseIfOwned(ctx, first.Key, 1)
		must(t, err)
		must(t, <-waited)
	})
	through, acquires := proxy(t, svc.URL, 0, 10*time.Second)
	c, err := client.New(through, client.WithRetries(50, time.Millisecond))
	must(t, err)
	for _, within := range []time.Duration{800 * time.Millisecond, 2500 * time.Millisecond} {
		acquires.Store(0)
		bounded, cancel := context.WithTimeout(ctx, within)
		_, err = c.Acquire(bounded, request("acme/infra", "envs/dev", 3))
		cancel()
		var unavailable *client.UnavailableError
		if !errors.As(err, &unavailable) {
			t.Fatalf("a shed acquire should answer unavailable, got %v", err)
		}
		// A Retry-After of 1s allows one try per second of the context, and one at its start.
		if most := 1 + int(within/time.Second); int(acquires.Load()) > most {
			t.Fatalf("within %v the acquire was sent %d times; the Retry-After allows %d",
				within, acquires.Load(), most)
		}
		if within < time.Second && (unavailable.Status != http.StatusServiceUnavailable ||
			errors.Is(err, context.DeadlineExceeded)) {
			t.Fatalf("a context shorter than the Retry-After should answer the service's 503, got %v", err)
		}
	}
}

func TestAnAcquireAProxyAnswered503IsNotSentAgain(t *testing.T) {
	// The proxy's own 503 does not say whether the service had the request: only the
	// service's overload answer proves it did no work.
	svc := servicetest.Serve(t)
	through, acquires := proxy(t, svc.URL, 1, 10*time.Second)
	c, err := client.New(through, client.WithRetries(3, 10*time.Millisecond))
	must(t, err)
	_, err = c.Acquire(context.Background(), request("acme/infra", "envs/prod", 1))
	var unavailable *client.UnavailableError
	if !errors.As(err, &unavailable) || unavailable.Status != http.StatusServiceUnavailable {
		t.Fatalf("the proxy's 503 should be answered as unavailable, got %v", err)
	}
	if n := acquires.Load(); n != 1 {
		t.Fatalf("an acquire a proxy answered 503 must be sent once, sent %d times", n)
	}
}

func TestAnAcquireTheServiceAnsweredUnavailableIsNotSentAgain(t *testing.T) {
	// The service's 503 "unavailable" (its store did not answer) can come after the store ran
	// the step: the grant may exist and be given back, and a retry answered with it would be
	// told it holds what the give-back frees.
	redis := servicetest.RedisServer(t)
	svc := servicetest.Serve(t, "--enhanced-locking-legacy-backend", "redis",
		"--enhanced-locking-redis-addr", redis.Addr)
	through, acquires := proxy(t, svc.URL, 0, 30*time.Second)
	c, err := client.New(through, client.WithRetries(3, 10*time.Millisecond))
	must(t, err)
	redis.Stop()
	_, err = c.Acquire(context.Background(), request("acme/infra", "envs/prod", 1))
	var unavailable *client.UnavailableError
	if !errors.As(err, &unavailable) || unavailable.Status != http.StatusServiceUnavailable {
		t.Fatalf("the acquire should be answered the service's 503, got %v", err)
	}
	if n := acquires.Load(); n != 1 {
		t.Fatalf("an acquire answered 503 unavailable must be sent once, sent %d times", n)
	}
}

func TestAPageThatIsNotTheServicesIsNotReadyAndNoEventStream(t *testing.T) {
	// A proxy's sign-in page (or a URL naming another web server) answers every path 200
	// with HTML: Ready must not call that ready, nor Events open it as a stream that then
	// has no events.
	page := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		_, _ = w.Write([]byte("<html><body>Sign in</body></html>\n\n"))
	}))
	t.Cleanup(page.Close)
	c, err := client.New(page.URL, client.WithRetries(1, 0))
	must(t, err)
	ctx := context.Background()
	var unavailable *client.UnavailableError
	if err := c.Ready(ctx); !errors.As(err, &unavailable) || !strings.Contains(err.Error(), "not the lock service") {
		t.Fatalf("a sign-in page is not a ready service, got %v", err)
	}
	stream, err := c.Events(ctx, client.EventFilter{})
	if err == nil {
		stream.Close() //nolint:errcheck
	}
	if !errors.As(err, &unavailable) || !strings.Contains(err.Error(), "text/html") {
		t.Fatalf("a sign-in page is not an event stream, got %v", err)
	}
	// The service itself is both.
	svc, err := client.New(servicetest.Serve(t).URL)
	must(t, err)
	must(t, svc.Ready(ctx))
	events, err := svc.Events(ctx, client.EventFilter{})
	must(t, err)
	must(t, events.Close())
}

func TestA404ThatIsNotTheServicesIsNotReadAsNoLock(t *testing.T) {
	// A wrong base path (or a proxy's page) answers 404 too: only the service's own answer
	// for the key means the key is free.
	svc := servicetest.Serve(t)
	ctx := context.Background()
	right, err := client.New(svc.URL)
	must(t, err)
	lock, err := right.Acquire(ctx, request("acme/infra", "envs/prod", 1))
	must(t, err)
	wrong, err := client.New(svc.URL+"/not-the-api", client.WithRetries(1, 0))
	must(t, err)
	if got, err := wrong.Get(ctx, lock.Key); !client.IsUnavailable(err) || got != nil {
		t.Fatalf("Get through a wrong path must be an error, got %+v, %v", got, err)
	}
	if got, err := wrong.Release(ctx, lock.Key); !client.IsUnavailable(err) || got != nil {
		t.Fatalf("Release through a wrong path must be an error, got %+v, %v", got, err)
	}
	if got, err := wrong.ReleaseIfOwned(ctx, lock.Key, 1); !client.IsUnavailable(err) || got != nil {
		t.Fatalf("ReleaseIfOwned through a wrong path must be an error, got %+v, %v", got, err)
	}
	// The service's own 404s are still "nothing there".
	if got, err := right.Get(ctx, "acme/infra/envs/dev/default/"); err != nil || got != nil {
		t.Fatalf("a free key is nil and no error, got %+v, %v", got, err)
	}
	if got, err := right.Release(ctx, "acme/infra/envs/dev/default/"); err != nil || got != nil {
		t.Fatalf("releasing a free key is nil and no error, got %+v, %v", got, err)
	}
	if found, err := right.Cancel(ctx, lock.Key, "no-such-request"); err != nil || found {
		t.Fatalf("cancelling what is not queued is false and no error, got %v, %v", found, err)
	}
	if held, err := right.Get(ctx, lock.Key); err != nil || held == nil || held.Pull.Num != 1 {
		t.Fatalf("the lock must still be held, got %+v, %v", held, err)
	}
}

func TestASwitchGapMovesTheStreamToTheNewBusAndOtherGapsDoNot(t *testing.T) {
	// The frames the service sends (api/sse.py): an event, a store switch's gap (its id is
	// the new event bus's), then a replay gap (no id: no place to resume from).
	frames := "id: 17-0\r\nevent: acquired\r\ndata: {\"id\":\"17-0\",\"type\":\"acquired\"," +
		"\"time\":\"2026-01-01T00:00:00Z\"}\r\n\r\n" +
		"id: 42-0\r\nevent: gap\r\ndata: {\"after\": \"17-0\", \"oldest\": null, " +
		"\"reason\": \"switched\", \"resume\": \"42-0\"}\r\n\r\n" +
		"event: gap\r\ndata: {\"after\": \"42-0\", \"oldest\": \"40-0\", \"reason\": \"replay\"}\r\n\r\n"
	stream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		_, _ = w.Write([]byte(frames))
		w.(http.Flusher).Flush()
		<-r.Context().Done() // open until the client leaves
	}))
	t.Cleanup(stream.Close)
	events := streamOf(t, stream.URL, 10*time.Second, client.WithRetries(1, 0))
	var got []string
	for range 3 {
		ev, err := events.Next()
		must(t, err)
		got = append(got, ev.Type+"@"+ev.ID+"->"+events.LastEventID())
	}
	want := "acquired@17-0->17-0 gap@42-0->42-0 gap@42-0->42-0"
	if strings.Join(got, " ") != want {
		t.Fatalf("want %s, got %s", want, strings.Join(got, " "))
	}
}

func TestAStreamThatFallsSilentIsReopenedThenGivenUp(t *testing.T) {
	// A service (or a proxy) that stops sending without closing: Next must not block for
	// good. Silent past WithStreamSilence (default a minute, four of the service's 15s
	// keep-alives), the connection is dropped and reopened as a broken one is, and after the
	// client's attempts Next answers an *UnavailableError saying so.
	var opened atomic.Int32
	silent := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		opened.Add(1)
		w.Header().Set("Content-Type", "text/event-stream")
		_, _ = w.Write([]byte(": following\n\n"))
		w.(http.Flusher).Flush()
		<-r.Context().Done() // nothing more, and open until the client leaves
	}))
	t.Cleanup(silent.Close)
	events := streamOf(t, silent.URL, 60*time.Second, client.WithRetries(2, 0),
		client.WithStreamSilence(200*time.Millisecond))
	// The stream returned no event: each reopening, once it follows, is said by a gap
	// (nothing to resume after), and the failures count on across them.
	ev, err := events.Next()
	gaps := 0
	for ; err == nil && ev.Type == client.EventGap && ev.Details["reason"] == client.GapReopened &&
		gaps < 2; gaps++ {
		ev, err = events.Next()
	}
	if gaps != 2 {
		t.Fatalf("each of the two reopenings should be said by a gap, got %d, then %+v, %v",
			gaps, ev, err)
	}
	if !client.IsUnavailable(err) || errors.Is(err, context.DeadlineExceeded) ||
		!strings.Contains(err.Error(), "sent nothing for 200ms") {
		t.Fatalf("a silent stream should be given up, got %v", err)
	}
	if n := opened.Load(); n != 3 {
		t.Fatalf("the stream should be opened once and reopened twice, was opened %d times", n)
	}
}

func TestAStreamWhoseServerNeverAnswersIsGivenUpBeforeItsHeaders(t *testing.T) {
	// A server (or a proxy) that accepts the connection and never answers: neither Events nor
	// Next may block for good. No headers within the call timeout (WithCallTimeout): Events
	// answers an *UnavailableError saying so, and a stream whose reconnection meets such a
	// server gives up after the client's attempts, as on a silent stream.
	l, err := net.Listen("tcp", servicetest.Loopback+":0")
	must(t, err)
	var accepted atomic.Int32
	var mu sync.Mutex
	var held []net.Conn
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			mu.Lock()
			held = append(held, conn) // read nothing, answer nothing, close nothing
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		l.Close() //nolint:errcheck
		mu.Lock()
		defer mu.Unlock()
		for _, conn := range held {
			conn.Close() //nolint:errcheck
		}
	})
	c, err := client.New("http://"+l.Addr().String(), client.WithRetries(2, 0),
		client.WithCallTimeout(200*time.Millisecond))
	must(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, err = c.Events(ctx, client.EventFilter{})
	if !client.IsUnavailable(err) || errors.Is(err, context.DeadlineExceeded) ||
		!strings.Contains(err.Error(), "no answer") || !strings.Contains(err.Error(), "200ms") {
		t.Fatalf("a server that never answers should be given up, got %v", err)
	}
	if n := accepted.Load(); n != 1 {
		t.Fatalf("Events should connect once, connected %d times", n)
	}

	// A stream that was answered, then broke, and whose service then accepts and never
	// answers: Next reconnects within the silence each time, then gives up.
	var opened atomic.Int32
	once := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if opened.Add(1) > 1 {
			<-r.Context().Done() // headers never sent
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		_, _ = w.Write([]byte(": following\n\n"))
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler) // the connection breaks
	}))
	t.Cleanup(once.Close)
	// The first connection is answered at once; a loaded machine gets 2s for it.
	events := streamOf(t, once.URL, 60*time.Second, client.WithRetries(2, 0),
		client.WithCallTimeout(2*time.Second))
	_, err = events.Next()
	if !client.IsUnavailable(err) || errors.Is(err, context.DeadlineExceeded) ||
		!strings.Contains(err.Error(), "no answer within 2s") {
		t.Fatalf("a reconnection that is never answered should be given up, got %v", err)
	}
	if n := opened.Load(); n != 3 {
		t.Fatalf("the stream should be opened once and reopened twice, was opened %d times", n)
	}
}

// streamOf is the event stream of the server at url, every event, open for at most within
// and closed when the test ends.
func streamOf(t *testing.T, url string, within time.Duration, opts ...client.Option) *client.EventStream {
	t.Helper()
	c, err := client.New(url, opts...)
	must(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), within)
	t.Cleanup(cancel)
	events, err := c.Events(ctx, client.EventFilter{})
	must(t, err)
	t.Cleanup(func() { events.Close() }) //nolint:errcheck
	return events
}

// firstEndpointGone is an HTTP client whose first connection goes to a port nothing listens
// on (an endpoint whose pod is gone, as a Service can still route to during a rollout or a
// restart) and every later one to the service at addr; it counts the connections it tried.
func firstEndpointGone(t *testing.T, addr string) (*http.Client, *atomic.Int32) {
	t.Helper()
	gone := "127.0.0.1:" + itoa(servicetest.FreePort(t))
	var dials atomic.Int32
	var dialer net.Dialer
	transport := &http.Transport{DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			if dials.Add(1) == 1 {
				return dialer.DialContext(ctx, network, gone)
			}
			return dialer.DialContext(ctx, network, addr)
		}}
	t.Cleanup(transport.CloseIdleConnections)
	return &http.Client{Transport: transport}, &dials
}

func TestACallSentOnceIsSentAgainWhenNoConnectionCouldBeMade(t *testing.T) {
	// A pull's release (what Atlantis calls when a pull request closes) and a release that
	// names no pull (its lock page's unlock) are sent once: repeated after the service acted
	// on them, they could lose the list of what was freed or free a lock another pull took
	// in between. A connection that could not be made reached nothing, so trying again is
	// the first try: without it the close fails, Atlantis does not ask again, and the pull's
	// locks stay held for every other pull.
	svc := servicetest.Serve(t)
	ctx := context.Background()
	owner, err := client.New(svc.URL)
	must(t, err)
	_, err = owner.Acquire(ctx, request("acme/infra", "envs/a", 12))
	must(t, err)
	_, err = owner.Acquire(ctx, request("acme/infra", "envs/b", 13))
	must(t, err)
	through := func() (*client.Client, *atomic.Int32) {
		hc, dials := firstEndpointGone(t, svc.Addr)
		c, err := client.New(svc.URL, client.WithHTTPClient(hc), client.WithRetries(3, 10*time.Millisecond))
		must(t, err)
		return c, dials
	}

	c, dials := through()
	freed, err := c.ReleasePull(ctx, "acme/infra", 12)
	if err != nil || len(freed) != 1 {
		t.Fatalf("ReleasePull after a connection that could not be made: want pull 12's lock "+
			"freed, got %v, %v (%d connections tried)", freed, err, dials.Load())
	}
	if dials.Load() != 2 {
		t.Fatalf("want the refused connection and one more, got %d", dials.Load())
	}
	c, _ = through()
	if lock, err := c.Release(ctx, "acme/infra/envs/b/default/"); err != nil || lock == nil || lock.Pull.Num != 13 {
		t.Fatalf("Release after a connection that could not be made: got %+v, %v", lock, err)
	}
	if locks, err := owner.List(ctx, client.ListFilter{}); err != nil || len(locks) != 0 {
		t.Fatalf("every lock should be free, got %+v, %v", locks, err)
	}
}

func TestACallMadeWhileTheServiceRestartsWaitsForItsPort(t *testing.T) {
	// A restart closes the service's port for longer than three quick attempts (~0.3s): a
	// refused connection reached nothing, so the call is sent again within its own time
	// until the service is back on the same port.
	svc := servicetest.Serve(t)
	c, err := client.New(svc.URL, client.WithCallTimeout(60*time.Second))
	must(t, err)
	svc.Kill()
	type result struct {
		lock *client.Lock
		err  error
	}
	done := make(chan result, 1)
	go func() {
		lock, err := c.Acquire(context.Background(), request("acme/infra", "envs/a", 12))
		done <- result{lock, err}
	}()
	svc.Restart(t) // seconds: a process started and its store opened
	r := <-done
	if r.err != nil || r.lock == nil || r.lock.Pull.Num != 12 {
		t.Fatalf("the acquire made during the restart should lock once the service is back, got %+v", r)
	}
}

func TestAHostNameThatDoesNotResolveIsNotTriedForTheCallsTime(t *testing.T) {
	// No restart mends a name that does not resolve (.invalid never does, RFC 6761): it is
	// not retried for the call's time, only by the count (here none).
	c, err := client.New("http://enhanced-locking.invalid:4142", client.WithRetries(1, 0),
		client.WithCallTimeout(time.Hour))
	must(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err = c.List(ctx, client.ListFilter{})
	var dns *net.DNSError
	if !client.IsUnavailable(err) || !errors.As(err, &dns) || ctx.Err() != nil {
		t.Fatalf("List should answer the resolver's error, not wait out its time: %v (context: %v)", err, ctx.Err())
	}
}

func TestARefusedConnectionIsTriedAgainWithPausesEvenWithoutABackoff(t *testing.T) {
	// WithRetries(n, 0) sets no pause between counted attempts; tried for the call's time, a
	// refused connection still gets pauses, not a loop of dials until the deadline.
	gone := "127.0.0.1:" + itoa(servicetest.FreePort(t)) // nothing listens there
	var dials atomic.Int32
	var dialer net.Dialer
	transport := &http.Transport{DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			dials.Add(1)
			return dialer.DialContext(ctx, network, gone)
		}}
	t.Cleanup(transport.CloseIdleConnections)
	c, err := client.New("http://"+gone, client.WithHTTPClient(&http.Client{Transport: transport}),
		client.WithRetries(1, 0), client.WithCallTimeout(time.Second))
	must(t, err)
	if _, err := c.List(context.Background(), client.ListFilter{}); !client.IsUnavailable(err) {
		t.Fatalf("List should be unavailable, got %v", err)
	}
	if n := dials.Load(); n < 2 || n > 100 {
		t.Fatalf("want a refused connection tried again with pauses within the call's 1s, got %d dials", n)
	}
}

func TestAStreamWhoseServiceRestartsReconnectsUntilItIsBack(t *testing.T) {
	// A restart closes the service's port for seconds, longer than the client's attempts in a
	// row (~0.7s): Next reconnects after jittered pauses for as long as the stream's context
	// lasts, as the other calls do within theirs, and goes on with the events once the
	// service is back on the same port.
	svc := servicetest.Serve(t, "--enhanced-locking-enabled")
	c, err := client.New(svc.URL)
	must(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	stream, err := c.Events(ctx, client.EventFilter{Repo: "acme/restart"})
	must(t, err)
	defer stream.Close() //nolint:errcheck
	_, err = c.Acquire(ctx, request("acme/restart", "before", 1))
	must(t, err)
	if first, err := stream.Next(); err != nil || first.Type != "acquired" {
		t.Fatalf("the first event should be the acquire, got %+v, %v", first, err)
	}
	svc.Kill()
	type result struct {
		event client.Event
		err   error
	}
	done := make(chan result, 1)
	go func() {
		event, err := stream.Next()
		done <- result{event, err}
	}()
	svc.Restart(t) // seconds: a process started and its store opened
	// Events from the service back up, until the stream reads one (it may reconnect after
	// the first, which a fresh event bus does not replay).
	for pull := 2; ; pull++ {
		if _, err := c.Acquire(ctx, request("acme/restart", "after/"+itoa(pull), pull)); err != nil {
			t.Fatalf("the service should lock again after its restart: %v", err)
		}
		select {
		case r := <-done:
			if r.err != nil || r.event.Type == "" {
				t.Fatalf("Next should read on once the service is back, got %+v, %v", r.event, r.err)
			}
			return
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// sharedHold makes pull hold acme/infra's project at path shared: the client asks for
// exclusive locks only, so the hold is asked for as any other client would.
func sharedHold(t *testing.T, url, path string, pull int) {
	t.Helper()
	body := `{"project": {"repoFullName": "acme/infra", "path": "` + path + `"}, "pull": {"num": ` +
		strconv.Itoa(pull) + `}, "user": {"username": "alice"}, "mode": "shared"}`
	resp, err := http.Post(url+"/v1/locks", "application/json", strings.NewReader(body))
	must(t, err)
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("pull %d should hold %s shared, got %d", pull, path, resp.StatusCode)
	}
}

func TestAnUpgradeOfThePullsSharedHoldIsSaidApartAndStartsItsLease(t *testing.T) {
	svc := servicetest.Serve(t, "--enhanced-locking-enabled")
	c, err := client.New(svc.URL)
	must(t, err)
	ctx := context.Background()
	sharedHold(t, svc.URL, "a", 4)
	sharedHold(t, svc.URL, "b", 4)
	lock, err := c.Acquire(ctx, request("acme/infra", "a", 4))
	must(t, err)
	if lock.Grant != client.GrantUpgraded || !lock.Grant.LeaseStartsNow() {
		t.Fatalf("pull 4's shared hold of a should be upgraded, got %+v", lock)
	}
	again, err := c.Acquire(ctx, request("acme/infra", "a", 4))
	must(t, err)
	if again.Grant != client.GrantAgain || again.Grant.LeaseStartsNow() || again.FencingToken != lock.FencingToken {
		t.Fatalf("asked again, pull 4 should get its exclusive lock unchanged, got %+v", again)
	}
	locks, err := c.AcquireBatch(ctx, batchOf(4, "b", "c"))
	must(t, err)
	if len(locks) != 2 || locks[0].Grant != client.GrantUpgraded || locks[1].Grant != client.GrantNew {
		t.Fatalf("b is upgraded by the batch, c granted by it: got %+v", locks)
	}
}

// next is what a stream's Next answered.
type next struct {
	event client.Event
	err   error
}

// nexting is stream's Next, answered on the channel.
func nexting(stream *client.EventStream) <-chan next {
	done := make(chan next, 1)
	go func() {
		event, err := stream.Next()
		done <- next{event, err}
	}()
	return done
}

// lockUntilRead asks c for locks of repo, a pull at a time from *pull on, until done answers
// (a reopened stream on a store's shared bus follows it a moment after its answer, which
// Next does not wait for as Events does, and a bus new after a restart does not replay what
// came before the stream came back).
func lockUntilRead(ctx context.Context, t *testing.T, c *client.Client, repo string, pull *int,
	done <-chan next) next {
	t.Helper()
	for ; ; *pull++ {
		if _, err := c.Acquire(ctx, request(repo, "p/"+itoa(*pull), *pull)); err != nil {
			t.Fatalf("the service should lock: %v", err)
		}
		select {
		case r := <-done:
			return r
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func TestAStreamReconnectingInTheOperatorsStartWindowWaitsThroughIt(t *testing.T) {
	// The operator restarts while the Redis its LockPolicy names is stopped: its service
	// opens on its own settings and answers every lock call, a reopening of the event stream
	// too, 503 "unavailable" until the policy is applied (at its next look once the store
	// answers). A stream opened before reconnects into that window: Next waits it through
	// within its context, as it does a restart, and reads on once the policy is applied.
	// Before, each 503 counted against the client's attempts in a row (~0.7s): Next failed.
	cp := servicetest.KubeControlPlane(t)
	port := servicetest.FreePort(t)
	redis := servicetest.RedisServerOn(t, port)
	cp.Apply(t, "default", servicetest.LockPolicy(map[string]any{"enabled": true,
		"backend": "redis", "redis": map[string]any{"addr": redis.Addr}}))
	operator := cp.Operator(t, "default")
	operator.WaitApplied(t)
	c, err := client.New(operator.URL)
	must(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	stream, err := c.Events(ctx, client.EventFilter{Repo: "acme/window"})
	must(t, err)
	defer stream.Close() //nolint:errcheck
	pull := 1
	if first := lockUntilRead(ctx, t, c, "acme/window", &pull, nexting(stream)); first.err != nil ||
		first.event.Type != "acquired" {
		t.Fatalf("the first event should be an acquire, got %+v, %v", first.event, first.err)
	}
	operator.Stop()
	redis.Stop()
	operator.Restart(t)
	if err := c.Ready(ctx); err == nil || !strings.Contains(err.Error(), "LockPolicy") {
		t.Fatalf("the operator should be in its start window, its readiness says %v", err)
	}
	done := nexting(stream)
	// The window lasts while the store is stopped: here a few seconds, many times the
	// client's attempts in a row.
	select {
	case r := <-done:
		t.Fatalf("Next should wait through the start window, got %+v, %v", r.event, r.err)
	case <-time.After(5 * time.Second):
	}
	servicetest.RedisServerOn(t, port)
	operator.WaitApplied(t)
	pull++
	if r := lockUntilRead(ctx, t, c, "acme/window", &pull, done); r.err != nil || r.event.Type == "" {
		t.Fatalf("Next should read on once the policy is applied, got %+v, %v", r.event, r.err)
	}
}
