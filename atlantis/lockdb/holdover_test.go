package lockdb_test

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/runatlantis/atlantis/server/core/locking"
	"github.com/runatlantis/atlantis/server/events"
	"github.com/runatlantis/atlantis/server/events/models"
	"github.com/runatlantis/atlantis/server/events/vcs/github"
	"github.com/runatlantis/atlantis/server/logging"

	"github.com/runatlantis/enhanced-locking/atlantis/client"
	"github.com/runatlantis/enhanced-locking/atlantis/internal/servicetest"
	"github.com/runatlantis/enhanced-locking/atlantis/lockdb"
)

// replan is a pull's plan of project in workspace default through Atlantis's own project
// locker (what doPlan asks), and the release that comes before a plan of the whole pull
// through Atlantis's own locking client (plan_command_runner.go, deletePlanLocks).
type replan struct {
	t        *testing.T
	database *lockdb.Database
	svc      *servicetest.Service
	project  models.Project
	key      string
}

// newReplan is the adapter on svc with opts.
func newReplan(t *testing.T, svc *servicetest.Service, opts ...lockdb.Option) replan {
	project := models.NewProject("acme/infra", "envs/prod", "")
	return replan{t: t, database: open(t, svc, opts...), svc: svc, project: project,
		key: models.GenerateLockKey(project, "default")}
}

func (r replan) ask(database *lockdb.Database, num int) (*events.TryLockResponse, error) {
	return projectLocker(database, &github.Client{}).TryLock(logging.NewNoopLogger(r.t),
		pullOf("acme/infra", num), alice, "default", r.project, true)
}

func (r replan) plan(num int) *events.TryLockResponse {
	r.t.Helper()
	got, err := r.ask(r.database, num)
	must(r.t, err)
	return got
}

// planAtOnce is pull num's plan through an adapter without a wait: the answer comes at once.
func (r replan) planAtOnce(num int) *events.TryLockResponse {
	r.t.Helper()
	got, err := r.ask(open(r.t, r.svc), num)
	must(r.t, err)
	return got
}

// waiting starts pull num's plan, which waits in the key's queue, and answers its answer.
func (r replan) waiting(num int) <-chan *events.TryLockResponse {
	r.t.Helper()
	answer := make(chan *events.TryLockResponse, 1)
	go func() {
		got, err := r.ask(r.database, num)
		if err != nil {
			r.t.Errorf("pull %d's plan: %v", num, err)
		}
		answer <- got
	}()
	waitForWaiters(r.t, r.database.Client(), r.key, 1)
	return answer
}

func (r replan) release(num int) {
	r.t.Helper()
	_, err := locking.NewClient(r.database).UnlockIfOwnedByPull(r.project, "default", num)
	must(r.t, err)
}

func (r replan) holder() *client.Lock {
	r.t.Helper()
	lock, err := r.database.Client().Get(context.Background(), r.key)
	must(r.t, err)
	return lock
}

func granted(t *testing.T, answer <-chan *events.TryLockResponse, what string) {
	t.Helper()
	select {
	case got := <-answer:
		if got == nil || !got.LockAcquired {
			t.Fatalf("%s should be granted, got %+v", what, got)
		}
	case <-time.After(time.Minute):
		t.Fatalf("%s was not granted within a minute", what)
	}
}

func TestAPlanOfTheWholePullKeepsItsLockFromAWaitingPull(t *testing.T) {
	// Before a plan of every project of a pull (`atlantis plan` without -p or -d, an autoplan
	// on a push), Atlantis frees the pull's locks of those projects and asks for them again
	// (deletePlanLocks: UnlockIfOwnedByPull, then doPlan's TryLock). With WithWait the
	// release holds the lock over for the pull (WithHoldOver, 30s by default): the pull
	// waiting for it waits on, the re-plan gets its lock again (the same hold, no lease as
	// before), and the pull's close frees it at once for the waiter.
	forEachStore(t, func(t *testing.T, s store) {
		r := newReplan(t, s.serve(t, "--enhanced-locking-enabled"), lockdb.WithWait(2*time.Minute))
		if !r.plan(1).LockAcquired {
			t.Fatal("pull 1's plan should get the free lock")
		}
		planned := r.holder()
		waiting := r.waiting(2)

		r.release(1) // pull 1's autoplan on a push: Atlantis frees its plan locks, then plans
		again := r.plan(1)
		if !again.LockAcquired {
			t.Fatalf("pull 1's re-plan should get its lock again, got %q", again.LockFailureReason)
		}
		kept := r.holder()
		if kept == nil || kept.Pull.Num != 1 || kept.FencingToken != planned.FencingToken || kept.ExpiresAt != nil {
			t.Fatalf("pull 1 should hold its plan's lock (token %d) again, without a lease, got %+v",
				planned.FencingToken, kept)
		}
		select {
		case got := <-waiting:
			t.Fatalf("pull 2's plan should still wait while pull 1 re-plans, got %+v", got)
		default:
		}
		if q := waitForWaiters(t, r.database.Client(), r.key, 1); len(q.Waiters) != 1 || q.Waiters[0].Pull != 2 {
			t.Fatalf("pull 2 should still be queued, the queue is %+v", q)
		}

		// Pull 1 is merged: Atlantis's UnlockByPull frees its locks at once, no hold-over.
		_, err := r.database.UnlockByPull("acme/infra", 1)
		must(t, err)
		granted(t, waiting, "pull 2's waiting plan, once pull 1 closed,")
		if holder := r.holder(); holder == nil || holder.Pull.Num != 2 {
			t.Fatalf("pull 2 should hold the lock, got %+v", holder)
		}
	})
}

func TestAHeldOverLockNotAskedForAgainGoesToTheWaiterWhenTheHoldOverEnds(t *testing.T) {
	// A release that is not followed by the pull's TryLock (a plan that failed, a project the
	// new commit no longer plans): the lock is the pull's until the hold-over ends, and then
	// the queue is served as after any release.
	forEachStore(t, func(t *testing.T, s store) {
		r := newReplan(t, s.serve(t, "--enhanced-locking-enabled"),
			lockdb.WithWait(2*time.Minute), lockdb.WithHoldOver(2*time.Second))
		if !r.plan(1).LockAcquired {
			t.Fatal("pull 1's plan should get the free lock")
		}
		waiting := r.waiting(2)
		r.release(1)
		heldOver := r.holder()
		if heldOver == nil || heldOver.Pull.Num != 1 || heldOver.ExpiresAt == nil {
			t.Fatalf("pull 1's lock should be held over, with the hold-over as its lease, got %+v", heldOver)
		}
		granted(t, waiting, "pull 2's waiting plan, after the hold-over,")
		next := r.holder()
		if next == nil || next.Pull.Num != 2 || next.AcquiredAt.Before(*heldOver.ExpiresAt) {
			t.Fatalf("pull 2 should be granted the lock when pull 1's hold-over ended (%v), got %+v",
				heldOver.ExpiresAt, next)
		}
		again := r.planAtOnce(1)
		want := "This project is currently locked by an unapplied plan from pull #2."
		if again.LockAcquired || !strings.Contains(again.LockFailureReason, want) {
			t.Fatalf("pull 1's plan after its hold-over should read %q, got %+v", want, again)
		}
	})
}

func TestAReplanUnderALockTTLGetsAWholeLeaseAgain(t *testing.T) {
	// With lock-ttl set the lock had a lease; the hold-over shortens it, and the re-plan's
	// TryLock renews it to lock-ttl from now, as for any lock its pull held already.
	r := newReplan(t, servicetest.Serve(t, "--enhanced-locking-enabled", "--enhanced-locking-lock-ttl", "2h"),
		lockdb.WithWait(2*time.Minute))
	if !r.plan(1).LockAcquired {
		t.Fatal("pull 1's plan should get the free lock")
	}
	r.release(1)
	if heldOver := r.holder(); heldOver == nil || heldOver.ExpiresAt == nil ||
		time.Until(*heldOver.ExpiresAt) > time.Minute {
		t.Fatalf("pull 1's held-over lock should end within the hold-over, got %+v", heldOver)
	}
	if !r.plan(1).LockAcquired {
		t.Fatal("pull 1's re-plan should get its lock again")
	}
	if kept := r.holder(); kept == nil || kept.ExpiresAt == nil || time.Until(*kept.ExpiresAt) < 110*time.Minute {
		t.Fatalf("pull 1's re-planned lock should have lock-ttl (2h) from now, got %+v", kept)
	}
}

func TestWithoutAHoldOverAPlanOfTheWholePullGivesItsLockToAWaitingPull(t *testing.T) {
	// WithHoldOver(0): the release frees the lock at once, and the pull waiting for it is
	// granted it before the re-plan asks; the re-plan is told "locked by" that pull.
	r := newReplan(t, servicetest.Serve(t, "--enhanced-locking-enabled"), lockdb.WithWait(2*time.Minute),
		lockdb.WithHoldOver(0))
	if !r.plan(1).LockAcquired {
		t.Fatal("pull 1's plan should get the free lock")
	}
	waiting := r.waiting(2)
	r.release(1)
	granted(t, waiting, "pull 2's waiting plan")
	again := r.planAtOnce(1)
	want := "This project is currently locked by an unapplied plan from pull #2."
	if again.LockAcquired || !strings.Contains(again.LockFailureReason, want) {
		t.Fatalf("pull 1's plan again should read %q, got %+v", want, again)
	}
}

func TestPullsWaitingThroughHoldOversNeverShareALockAndAreAllServed(t *testing.T) {
	// Goroutines of several pulls through Atlantis's locking client, each waiting in the
	// queue, holding, releasing (held over), asking again as a re-plan does, and releasing
	// again for good: the hold-over ends with the pull's re-plan or runs out and goes to the
	// next waiter. No key is held by two pulls at once (each interval runs from TryLock's
	// answer to the release's call, inside the real holding: held-over time is the pull's
	// too), and every waiter is served within its wait.
	forEachStore(t, func(t *testing.T, s store) {
		database := open(t, s.serve(t, "--enhanced-locking-enabled"),
			lockdb.WithWait(90*time.Second), lockdb.WithHoldOver(100*time.Millisecond))
		locker := locking.NewClient(database)
		const workers, rounds = 8, 3
		projects := []models.Project{models.NewProject("acme/infra", "envs/prod", ""),
			models.NewProject("acme/infra", "envs/dev", "")}
		var mu sync.Mutex
		history := map[string][]grant{}
		var wg sync.WaitGroup
		hold := func(w int, project models.Project, pull models.PullRequest) bool {
			got, err := locker.TryLock(project, "default", pull, alice)
			if err != nil || !got.LockAcquired {
				t.Errorf("worker %d should be served within its wait, got %+v %v", w, got, err)
				return false
			}
			start := time.Now()
			time.Sleep(time.Millisecond)
			end := time.Now()
			if _, err := locker.UnlockIfOwnedByPull(project, "default", pull.Num); err != nil {
				t.Errorf("worker %d: unlock: %v", w, err)
				return false
			}
			mu.Lock()
			history[got.LockKey] = append(history[got.LockKey], grant{pull.Num, start, end})
			mu.Unlock()
			return true
		}
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				pull := pullOf("acme/infra", 100+w)
				for r := 0; r < rounds; r++ {
					project := projects[(w+r)%len(projects)]
					// a plan, then a re-plan of the whole pull: released (held over), asked again
					if !hold(w, project, pull) || !hold(w, project, pull) {
						return
					}
				}
			}(w)
		}
		wg.Wait()
		grants := 0
		for key, gs := range history {
			grants += len(gs)
			for i := range gs {
				for j := i + 1; j < len(gs); j++ {
					if gs[i].pull != gs[j].pull && gs[i].start.Before(gs[j].end) && gs[j].start.Before(gs[i].end) {
						t.Fatalf("%s granted twice: pull %d and pull %d held it at once", key, gs[i].pull, gs[j].pull)
					}
				}
			}
		}
		if want := workers * rounds * 2; grants != want {
			t.Fatalf("%d holdings recorded, want %d", grants, want)
		}
	})
}
