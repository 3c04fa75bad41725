package client_test

import (
	"context"
	"net/http"
	"net/http/httputil"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	"github.com/runatlantis/enhanced-locking/atlantis/client"
	"github.com/runatlantis/enhanced-locking/atlantis/internal/servicetest"
)

func TestAStreamBrokenBeforeItsFirstEventSaysWhatItCannotResume(t *testing.T) {
	// The stream breaks after it followed and before any event came: it has no id to resume
	// from (Last-Event-ID), so its reopening follows from then on. A lock taken after Events
	// returned, while the stream was broken, is not on the reopened stream: Next must say so
	// (a gap: re-read the state), not go on as if nothing was missed. Before, Next returned
	// the next lock's event as if it were the first.
	svc := servicetest.Serve(t, "--enhanced-locking-enabled")
	target, err := url.Parse(svc.URL)
	must(t, err)
	forward := httputil.NewSingleHostReverseProxy(target)
	var opened atomic.Int32
	reopening := make(chan struct{})
	lockedMeanwhile := make(chan struct{})
	through := servicetest.Proxy(t, svc.URL, 0, func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != "/v1/events" {
			return false
		}
		if opened.Add(1) == 1 {
			w.Header().Set("Content-Type", "text/event-stream")
			_, _ = w.Write([]byte(": following\n\n"))
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler) // the connection breaks
		}
		if r.Header.Get("Last-Event-ID") == "" {
			select {
			case reopening <- struct{}{}:
				<-lockedMeanwhile // the reopening reaches the service once the lock is taken
			default:
			}
		}
		forward.ServeHTTP(w, r)
		return true
	})
	c, err := client.New(through, client.WithRetries(3, time.Millisecond))
	must(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	stream, err := c.Events(ctx, client.EventFilter{Repo: "acme/reopen"})
	must(t, err)
	defer stream.Close() //nolint:errcheck
	done := nexting(stream)
	select {
	case <-reopening:
	case got := <-done:
		t.Fatalf("Next should reopen the broken stream, got %+v, %v", got.event, got.err)
	}
	direct, err := client.New(svc.URL)
	must(t, err)
	if _, err := direct.Acquire(ctx, request("acme/reopen", "missed/", 1)); err != nil {
		t.Fatalf("the service should lock: %v", err)
	}
	close(lockedMeanwhile)
	pull := 2
	got := lockUntilRead(ctx, t, direct, "acme/reopen", &pull, done)
	if got.err != nil {
		t.Fatalf("the reopened stream should read on, got %v", got.err)
	}
	if got.event.Type != client.EventGap || got.event.Details["reason"] != client.GapReopened {
		t.Fatalf("the first event after Events returned is the lock taken while the stream "+
			"was broken, or a gap saying it may be missing; got %s of %s", got.event.Type,
			got.event.Key)
	}
	// The gap is said once the reopened stream follows: it reads on with the locks taken
	// since (pull 2, taken as it followed, or the next).
	pull++
	got = lockUntilRead(ctx, t, direct, "acme/reopen", &pull, nexting(stream))
	if got.err != nil || got.event.Type != "acquired" || got.event.Lock == nil ||
		got.event.Lock.Pull.Num < 2 {
		t.Fatalf("after the gap the stream should read on with a lock taken since, got %+v, %v",
			got.event, got.err)
	}
}
