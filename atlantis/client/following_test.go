package client_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/runatlantis/enhanced-locking/atlantis/client"
	"github.com/runatlantis/enhanced-locking/atlantis/internal/servicetest"
)

// fillEvents appends n events of another repository to the service's event stream in the
// Redis at addr (the Redis Stream "atlantis:enhanced:events" a replica over Redis reads its
// events from), each with details of a few kilobytes: a store that holds many events, as one
// of a busy service does (the replica loads the newest 10 000 once something follows them).
func fillEvents(t *testing.T, addr string, n int) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	must(t, err)
	defer conn.Close() //nolint:errcheck
	out := bufio.NewWriter(conn)
	padding := strings.Repeat("x", 4096)
	for i := range n {
		event := fmt.Sprintf(`{"id":"","type":"released","time":"2026-01-01T00:00:00Z",`+
			`"key":"acme/other/p%d/default/","repo":"acme/other","lock":null,`+
			`"details":{"note":%q}}`, i, padding)
		args := []string{"XADD", "atlantis:enhanced:events", "*", "e", event}
		fmt.Fprintf(out, "*%d\r\n", len(args))
		for _, arg := range args {
			fmt.Fprintf(out, "$%d\r\n%s\r\n", len(arg), arg)
		}
	}
	must(t, out.Flush())
	replies := bufio.NewReader(conn)
	for range n {
		line, err := replies.ReadString('\n')
		must(t, err)
		if !strings.HasPrefix(line, "$") { // an XADD answers the entry's id
			t.Fatalf("redis refused an XADD: %q", line)
		}
		if _, err := replies.ReadString('\n'); err != nil {
			t.Fatal(err)
		}
	}
}

// firstEventOf is the first event stream reads, while pulls of repo lock projects p/<pull>
// one after another from pull 1 on (the first lock is asked for as soon as Events returned;
// the others only until the stream reads an event); and the key of pull 1's lock.
func firstEventOf(ctx context.Context, t *testing.T, c *client.Client, repo string,
	stream *client.EventStream) (next, string) {
	t.Helper()
	done := nexting(stream)
	first, err := c.Acquire(ctx, request(repo, "p/1", 1))
	must(t, err)
	pull := 2
	got := lockUntilRead(ctx, t, c, repo, &pull, done)
	return got, first.Key
}

func TestEventsReturnsOnceTheStreamFollowsSoALockTakenAtOnceIsItsFirstEvent(t *testing.T) {
	// Over Redis, a replica answers a stream's headers at once, then loads the events its
	// store holds and asks it where "now" is; the stream follows from there, and says so by
	// its first line, ": following". A lock taken between the headers and that line has its
	// event before "now": not on the stream. Events returns only after the line, so a lock
	// taken as soon as it returned is the stream's first event. A store holding many events
	// makes the gap wide (loading them takes a while): before, the first lock's event was
	// missed there every time.
	redis := servicetest.Redis(t)
	fillEvents(t, redis, 10_000)
	svc := servicetest.Serve(t, append(servicetest.RedisArgs(redis), "--enhanced-locking-enabled")...)
	c, err := client.New(svc.URL)
	must(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	stream, err := c.Events(ctx, client.EventFilter{Repo: "acme/first"})
	must(t, err)
	defer stream.Close() //nolint:errcheck
	got, key := firstEventOf(ctx, t, c, "acme/first", stream)
	must(t, got.err)
	if got.event.Type != "acquired" || got.event.Key != key {
		t.Fatalf("the stream's first event should be the acquire of %s, taken as soon as "+
			"Events returned; got %s of %s", key, got.event.Type, got.event.Key)
	}
}

func TestEveryStreamOpenedOverRedisHasTheLockTakenAtOnce(t *testing.T) {
	// A stream opened, a lock taken at once, the stream's first event read, the lock
	// released: round after round on one replica over Redis (its events loaded already: the
	// gap is the ask of where "now" is), none may miss the lock taken at once.
	redis := servicetest.Redis(t)
	svc := servicetest.Serve(t, append(servicetest.RedisArgs(redis), "--enhanced-locking-enabled")...)
	c, err := client.New(svc.URL)
	must(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	const rounds = 200
	missed := 0
	for round := range rounds {
		repo := fmt.Sprintf("acme/round%d", round)
		stream, err := c.Events(ctx, client.EventFilter{Repo: repo, Types: []string{"acquired"}})
		must(t, err)
		got, key := firstEventOf(ctx, t, c, repo, stream)
		must(t, got.err)
		if got.event.Key != key {
			missed++
		}
		must(t, stream.Close())
	}
	if missed > 0 {
		t.Fatalf("%d of %d streams missed the lock taken as soon as Events returned", missed, rounds)
	}
}

func TestEventsOnAServiceWhoseStoreDoesNotAnswerIsGivenUpWithinTheCallTimeout(t *testing.T) {
	// A service over a Redis that stopped (before anything followed its events) answers the
	// stream's headers, then waits for the store to say where the events stand: it does not
	// follow them while the store is away. Events does not hold its caller past the call
	// timeout: an *UnavailableError saying what it waited for.
	redis := servicetest.RedisServer(t)
	svc := servicetest.Serve(t, append(servicetest.RedisArgs(redis.Addr),
		"--enhanced-locking-enabled")...)
	redis.Stop()
	c, err := client.New(svc.URL, client.WithCallTimeout(2*time.Second))
	must(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	stream, err := c.Events(ctx, client.EventFilter{})
	if err == nil {
		stream.Close() //nolint:errcheck
	}
	if !client.IsUnavailable(err) || errors.Is(err, context.DeadlineExceeded) ||
		!strings.Contains(err.Error(), "did not follow the events") ||
		!strings.Contains(err.Error(), "within 2s") {
		t.Fatalf("a stream that never follows should be given up at the call timeout, got %v", err)
	}
}
