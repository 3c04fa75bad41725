package lockdb_test

import (
	"testing"
	"time"

	"github.com/runatlantis/enhanced-locking/atlantis/internal/servicetest"
	"github.com/runatlantis/enhanced-locking/atlantis/lockdb"
)

func TestAReplanWithinTheHoldOverOnThePreviousReleaseOfTheServiceGetsItsLock(t *testing.T) {
	// The service of the previous release cannot end a lease (its refresh refuses a ttl of 0s
	// with a 422): the re-plan's TryLock within the hold-over gives the lock back and asks
	// again, gets it without a lease (no lock-ttl), and the adapter holds over no more, so a
	// later release frees the lock at once for the waiting pull.
	svc := servicetest.ServeRelease(t, servicetest.PreviousRelease, "--enhanced-locking-enabled")
	r := newReplan(t, svc, lockdb.WithWait(2*time.Minute))
	if !r.plan(1).LockAcquired {
		t.Fatal("pull 1's plan should get the free lock")
	}
	r.release(1)
	if heldOver := r.holder(); heldOver == nil || heldOver.Pull.Num != 1 || heldOver.ExpiresAt == nil {
		t.Fatalf("pull 1's lock should be held over, with the hold-over as its lease, got %+v", heldOver)
	}
	again, err := r.ask(r.database, 1)
	if err != nil {
		t.Fatalf("pull 1's re-plan within the hold-over should not fail on the previous release: %v", err)
	}
	if !again.LockAcquired {
		t.Fatalf("pull 1's re-plan should get the lock, got %q", again.LockFailureReason)
	}
	if kept := r.holder(); kept == nil || kept.Pull.Num != 1 || kept.ExpiresAt != nil {
		t.Fatalf("pull 1 should hold the lock without a lease (no lock-ttl), got %+v", kept)
	}

	waiting := r.waiting(2)
	r.release(1)
	granted(t, waiting, "pull 2's waiting plan, once pull 1's lock was freed (no hold-over),")
	if holder := r.holder(); holder == nil || holder.Pull.Num != 2 {
		t.Fatalf("pull 2 should hold the lock, got %+v", holder)
	}
}

func TestWithALockTTLTheHoldOverStaysOnAgainstThePreviousReleaseOfTheService(t *testing.T) {
	// With lock-ttl set the re-plan renews the lease to lock-ttl, which the previous release
	// can do: the held-over lock is the pull's again, the waiting pull still waits, and a
	// later release holds over again.
	svc := servicetest.ServeRelease(t, servicetest.PreviousRelease, "--enhanced-locking-enabled",
		"--enhanced-locking-lock-ttl", "2h")
	r := newReplan(t, svc, lockdb.WithWait(2*time.Minute))
	if !r.plan(1).LockAcquired {
		t.Fatal("pull 1's plan should get the free lock")
	}
	planned := r.holder()
	waiting := r.waiting(2)
	for round := 1; round <= 2; round++ {
		r.release(1)
		if heldOver := r.holder(); heldOver == nil || heldOver.Pull.Num != 1 || heldOver.ExpiresAt == nil ||
			time.Until(*heldOver.ExpiresAt) > time.Minute {
			t.Fatalf("round %d: pull 1's lock should be held over, ending within the hold-over, got %+v",
				round, heldOver)
		}
		if !r.plan(1).LockAcquired {
			t.Fatalf("round %d: pull 1's re-plan should get its lock again", round)
		}
		kept := r.holder()
		if kept == nil || kept.FencingToken != planned.FencingToken || kept.ExpiresAt == nil ||
			time.Until(*kept.ExpiresAt) < 110*time.Minute {
			t.Fatalf("round %d: pull 1 should hold its plan's lock (token %d) with lock-ttl (2h) "+
				"from now, got %+v", round, planned.FencingToken, kept)
		}
	}
	select {
	case got := <-waiting:
		t.Fatalf("pull 2's plan should still wait while pull 1 re-plans, got %+v", got)
	default:
	}
	_, err := r.database.UnlockByPull("acme/infra", 1)
	must(t, err)
	granted(t, waiting, "pull 2's waiting plan, once pull 1 closed,")
}
