// Package lockdb is Atlantis's lock database (db.Database, server/core/db) backed by the
// lock service.
//
// The six lock methods (TryLock, Unlock, UnlockIfOwnedByPull, List, GetLock, UnlockByPull)
// go to the service over its HTTP API; pull statuses and command locks (the global apply
// lock) stay in the Atlantis database it wraps — BoltDB or Redis, as Atlantis opened it. An
// Atlantis build wires it in where server.go chooses its database:
//
//	wrapped, _ := boltdb.New(dataDir)           // or redis.NewWithConfig(...)
//	database, err := lockdb.New("http://enhanced-locking:4142", wrapped,
//	        lockdb.WithWait(2*time.Minute))     // queue instead of "locked by #12"
//
// The service unreachable is an error from every lock method, so Atlantis fails closed as
// it does when its own database is down: nothing is granted that was not recorded.
package lockdb

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/runatlantis/atlantis/server/core/db"
	"github.com/runatlantis/atlantis/server/events/command"
	"github.com/runatlantis/atlantis/server/events/models"

	"github.com/runatlantis/enhanced-locking/atlantis/client"
)

// Database sends lock calls to the service and the rest to the database it wraps.
type Database struct {
	service  *client.Client
	wrapped  db.Database
	wait     time.Duration
	priority client.Priority
	byCmd    map[command.Name]client.Priority
	timeout  time.Duration
	// holdOver: how long UnlockIfOwnedByPull keeps the lock for its pull (see WithHoldOver);
	// holdOverSet: the operator chose it.
	holdOver    time.Duration
	holdOverSet bool
	// noLeaseEnd: the service refused to end a lease (a release before refresh took a ttl of
	// 0s): no hold-over from then on (see renew). Shared by every view (ForCommand).
	noLeaseEnd *atomic.Bool
	// chosen: priority is one the operator set (WithPriority, WithCommandPriorities), not the
	// adapter's default for the command; cmdChosen: byCmd is the operator's.
	chosen, cmdChosen bool

	clientOpts []client.Option
}

var _ db.Database = (*Database)(nil)

// Option configures a Database.
type Option func(*Database)

// WithWait lets TryLock wait in the key's queue up to d before answering "locked by another
// pull" (0, the default: fail fast, as Atlantis does). Waiting needs the service's enhanced
// locker (enhanced-locking-enabled); the legacy locker answers at once. d is at most the
// service's enhanced-locking-max-timeout (5m unless set): a longer wait is refused, not
// shortened, and every TryLock fails with a *client.InvalidError naming the setting.
func WithWait(d time.Duration) Option { return func(b *Database) { b.wait = d } }

// DefaultHoldOver is how long UnlockIfOwnedByPull keeps a lock for its pull when TryLock
// waits in the queue (WithWait) and WithHoldOver does not say otherwise.
const DefaultHoldOver = 30 * time.Second

// WithHoldOver sets how long UnlockIfOwnedByPull keeps the lock for its pull instead of
// freeing it at once (0: at once, as Atlantis's own databases do). Atlantis frees a pull's
// plan locks before it plans the whole pull again and then asks for them again (v0.47.1,
// plan_command_runner.go, deletePlanLocks): a pull waiting in the queue would be granted
// the key in between, and the re-plan told "locked by" it. Held over, the lock stays the
// pull's with a lease of d: the pull's TryLock within it gets it again (the same hold, its
// lease as a new grant's: the service's lock-ttl, or none), a waiter waits it out, and a
// lock not asked for again within d expires and goes to the queue as after any release.
// UnlockByPull (a close, a merge, `atlantis unlock`) and Unlock free at once. A service of
// the previous release cannot end the hold-over's lease when the pull asks again (see renew):
// the first refusal turns the hold-over off. Default:
// DefaultHoldOver with WithWait, 0 without (nothing waits to take a key in between).
func WithHoldOver(d time.Duration) Option {
	return func(b *Database) { b.holdOver, b.holdOverSet = d, true }
}

// WithPriority is TryLock's priority in the queue when no command says otherwise
// (default normal).
func WithPriority(p client.Priority) Option {
	return func(b *Database) { b.priority, b.chosen = p, true }
}

// WithCommandPriorities sets the priority of each command's view (see ForCommand); the
// default puts the commands that write the state above plan: {apply: high, import: high,
// state: high, plan: normal}. A command the map does not name asks with WithPriority's.
// Asking above normal needs the service's prioritize right, which its locker role has not:
// a default priority the service refuses for it is asked again at normal; one set here or
// with WithPriority is refused as it came (a *client.DeniedError whose Verb is "prioritize").
func WithCommandPriorities(m map[command.Name]client.Priority) Option {
	return func(b *Database) { b.byCmd, b.cmdChosen = maps.Clone(m), true }
}

// WithTimeout bounds each call (db.Database passes no context); a waiting TryLock gets its
// wait on top. Default 30s; 0: unbounded. It is the client's call bound too (see
// client.WithCallTimeout), over one given in WithClientOptions.
func WithTimeout(d time.Duration) Option { return func(b *Database) { b.timeout = d } }

// WithClientOptions configures the HTTP client (bearer token, retries, transport).
func WithClientOptions(opts ...client.Option) Option {
	return func(b *Database) { b.clientOpts = append(b.clientOpts, opts...) }
}

// New is the lock database at serviceURL, with pull statuses and command locks in wrapped.
// It does not call the service: Ping does.
func New(serviceURL string, wrapped db.Database, opts ...Option) (*Database, error) {
	if wrapped == nil {
		return nil, errors.New("lockdb: a database to keep pull statuses and command locks in is needed")
	}
	b := &Database{
		wrapped:    wrapped,
		priority:   client.PriorityNormal,
		byCmd:      defaultCommandPriorities(),
		timeout:    30 * time.Second,
		noLeaseEnd: new(atomic.Bool),
	}
	for _, opt := range opts {
		opt(b)
	}
	if !b.holdOverSet && b.wait > 0 {
		b.holdOver = DefaultHoldOver
	}
	// The client bounds each call by its own call timeout as well: it is this one, or the
	// client's default would cut a longer WithTimeout short.
	svc, err := client.New(serviceURL, append(b.clientOpts, client.WithCallTimeout(b.timeout))...)
	if err != nil {
		return nil, err
	}
	b.service = svc
	b.clientOpts = nil
	return b, nil
}

// defaultCommandPriorities puts `atlantis import` and `atlantis state rm` above plan, and
// apply: they write the state, and import and state rm take the project lock whenever
// repository locks are on (Atlantis v0.47.1, project_command_runner.go doImport and
// doStateRm), so they meet plans in the queue of the default repo_locks mode, on_plan; an
// apply asks only in mode on_apply, where plans take no lock.
func defaultCommandPriorities() map[command.Name]client.Priority {
	return map[command.Name]client.Priority{
		command.Apply: client.PriorityHigh, command.Import: client.PriorityHigh,
		command.State: client.PriorityHigh, command.Plan: client.PriorityNormal,
	}
}

// ForCommand is a view of the same database whose TryLock asks with the command's priority
// (apply, import and state above plan by default): an Atlantis build gives each command
// runner its view.
func (b *Database) ForCommand(name command.Name) *Database {
	view := *b
	if p, ok := b.byCmd[name]; ok {
		view.priority, view.chosen = p, b.cmdChosen
	}
	return &view
}

// Client is the service client the database uses (queues, events, admin calls).
func (b *Database) Client() *client.Client { return b.service }

// Wrapped is the Atlantis database that keeps pull statuses and command locks.
func (b *Database) Wrapped() db.Database { return b.wrapped }

func (b *Database) ctx(extra time.Duration) (context.Context, context.CancelFunc) {
	if b.timeout <= 0 {
		return context.WithCancel(context.Background())
	}
	return context.WithTimeout(context.Background(), b.timeout+extra)
}

// verbPrioritize is the right to ask above normal priority (the service's 403 names it).
const verbPrioritize = "prioritize"

func key(p models.Project, workspace string) string {
	return client.LockKey(project(p), workspace)
}

// pageKey is the key of the parts Unlock and GetLock are given, joined as Atlantis joins
// them (models.GenerateLockKey, as its own databases do), the path not cleaned. Atlantis
// calls them from its lock pages (GET /lock?id=, the discard button's DELETE /locks?id=)
// with the parts locking.Client split out of a listed key (locking.go, keyRegex: the
// repository up to the key's second slash, then the longest path), which are not the
// project's own parts when its repository has more (GitLab's grp/sub/proj, Azure DevOps's
// org/project/repo: repository grp/sub, path "proj/." for its root project) or its name has
// a '/' (Atlantis allows one, raw/project.go: the root project "team/app" of acme/infra
// comes as path "./default", workspace "team", name "app"). Joined, they are the listed key
// again; the path cleaned ("default") would name another project's key.
func pageKey(p models.Project, workspace string) string {
	if workspace == "" {
		workspace = "default"
	}
	return models.GenerateLockKey(p, workspace)
}

// TryLock asks the service for the lock. Granted: (true, lock). Held by another pull:
// (false, the holder). The same pull asking again gets its lock (true), as Atlantis's
// project locker expects. Held by a project of another repository whose key is the same
// (reason collision): an error, never (false, holder) — Atlantis's project locker takes a
// holder with its own pull number for itself. A request taken out of the queue while it
// waited (reason cancelled: its pull's locks were released by UnlockByPull, on a close or an
// `atlantis unlock`, or an admin cancelled it) is an error too, saying so: "locked by" the
// holder would tell the user to wait for a lock nobody is waiting for any more. A lock with
// a lease (the service's lock-ttl) that the pull held already is renewed to lock-ttl from
// now (see renew). An error leaves the locks as they were before the call, as Atlantis's own
// databases do (Atlantis reads it as "not locked" and unlocks nothing): a fresh grant is not
// renewed, so nothing can fail after it.
func (b *Database) TryLock(lock models.ProjectLock) (bool, models.ProjectLock, error) {
	ctx, cancel := b.ctx(b.wait)
	defer cancel()
	request := client.AcquireRequest{
		Project:   project(lock.Project),
		Workspace: lock.Workspace,
		Pull:      pull(lock.Pull),
		User:      user(lock.User),
		Priority:  b.priority,
		Wait:      b.wait,
	}
	granted, err := b.service.Acquire(ctx, request)
	var denied *client.DeniedError
	if errors.As(err, &denied) && denied.Verb == verbPrioritize && !b.chosen &&
		b.priority != client.PriorityNormal {
		// The command's default priority (apply, import, state: high) needs the prioritize
		// right, which the locker role Atlantis is given has not: ask at normal, as a
		// caller without it can. The 403 came before the service did anything with the
		// request. A priority the operator chose is refused as it came.
		request.Priority = client.PriorityNormal
		granted, err = b.service.Acquire(ctx, request)
	}
	if err == nil && granted.ExpiresAt != nil && !granted.Grant.LeaseStartsNow() {
		err = b.renew(ctx, granted, lock.Project.RepoFullName)
		if errors.Is(err, errLeaseCannotEnd) {
			// A service of the release before refresh took a ttl of 0s cannot end the
			// hold-over's lease, which would end under the command: the pull gives the lock
			// back and asks again below, as without a hold-over (a waiter is served first).
			// The lock not given back (the service unreachable): the error, the lock as it
			// was, the pull's until its hold-over ends; another pull's already (the
			// hold-over ran out in between): nothing is held either.
			var notOwner *client.NotOwnerError
			if _, err = b.service.ReleaseIfOwnedIn(ctx, granted.Key, lock.Project.RepoFullName,
				granted.Pull.Num); err == nil || errors.As(err, &notOwner) {
				err = errLeaseRanOut
			}
		}
		if errors.Is(err, errLeaseRanOut) {
			// The lease ended between the grant and its renewal (a hold-over that ran out as
			// its pull asked again; the key free, or another pull's since): nothing is held,
			// so ask once more, as running the command again would — waiting in the queue
			// with WithWait, else told who holds it; a fresh grant is not renewed.
			granted, err = b.service.Acquire(ctx, request)
			if err == nil && granted.ExpiresAt != nil && !granted.Grant.LeaseStartsNow() {
				err = b.renew(ctx, granted, lock.Project.RepoFullName)
			}
		}
	}
	if err == nil {
		return true, lock, nil
	}
	var held *client.HeldError
	if errors.As(err, &held) && held.Reason == client.ReasonCancelled {
		return false, models.ProjectLock{}, fromService(err)
	}
	if errors.As(err, &held) && held.Holder != nil {
		if other := held.Holder; held.Reason == client.ReasonCollision ||
			other.Project.RepoFullName != lock.Project.RepoFullName || other.Pull.Num == lock.Pull.Num {
			// Atlantis reads "not acquired, held by my pull number" as acquired: a project of
			// another repository whose parts join to the same key (GitLab's grp/sub + proj/x
			// and grp/sub/proj + x), whose merge request can have the same number, must not
			// be read so.
			return false, models.ProjectLock{}, fmt.Errorf("lock service: %s is held by pull #%d of "+
				"%s, a project of another repository whose lock key is the same: %w",
				held.Key, other.Pull.Num, other.Project.RepoFullName, err)
		}
		holder := projectLock(*held.Holder)
		if holder.Pull.BaseRepo.VCSHost.Hostname == "" && lock.Pull.BaseRepo.VCSHost.Hostname != "" {
			// A holder that came without a VCS host (taken by a caller other than Atlantis)
			// would have an empty BaseRepo, whose host type reads as GitHub: Atlantis then
			// links its pull through the GitHub client, an error where GitHub is not set up,
			// and the plan fails instead of saying who holds the lock. It gets the asking
			// lock's host: the same key, so the same repository's host.
			owner, name := models.SplitRepoFullName(holder.Project.RepoFullName)
			holder.Pull.BaseRepo = models.Repo{FullName: holder.Project.RepoFullName, Owner: owner,
				Name: name, VCSHost: lock.Pull.BaseRepo.VCSHost}
		}
		return false, holder, nil
	}
	return false, models.ProjectLock{}, fromService(err)
}

// errLeaseRanOut: a lock's lease ended between its grant and its renewal; nothing is held.
var errLeaseRanOut = errors.New("ended before it could be renewed: not locked (run the command again)")

// errLeaseCannotEnd: the service refused a refresh's ttl of 0s (a 422 naming ttl), as the
// release before it took one did; the lease stays as it was.
var errLeaseCannotEnd = errors.New("lease cannot be ended by this lock service (an older release)")

// renew moves the lease of a lock its pull held already to lock-ttl from now. The pull that
// holds a lock gets it back as it was, lease and all: the holder's command (an import or a
// state rm after its plan, a plan of one project again) would run on what is left of the
// lease, and the lock could expire under it and go to the next waiter. (An apply in
// Atlantis's default repo_locks mode, on_plan, does not call TryLock: it runs on its plan's
// lease.) A fresh grant (client.GrantNew, or client.GrantUpgraded: its pull's shared hold
// made exclusive, a new lease) has its whole lease and is not renewed;
// one the service did not say of (an older service, a proxy that drops the header) is
// renewed as well. The renewal not answered (the service unreachable, a 503): an error, and
// the lock as it was, the pull's, with the lease it had. The lease ended in between (the key
// free, or taken by another pull since, a *client.HeldError naming it): errLeaseRanOut,
// nothing is held, and TryLock asks once more. No lock-ttl to renew to (the service's lock-ttl is 0, a 409 without a
// holder): the lease is ended (client.EndLease), as a lock granted now has none — a lease
// there is a hold-over (WithHoldOver) or a caller's ttl; a service of the release before
// refresh took a ttl of 0s cannot end it (a 422 naming ttl): errLeaseCannotEnd, the lease as
// it was, TryLock gives the lock back and asks again, and the hold-over is off from then on.
// The key moved to the legacy side,
// whose locks have no lease (a 409 naming this pull): the grant stands as it came.
func (b *Database) renew(ctx context.Context, granted *client.Lock, repo string) error {
	renewed, err := b.service.Refresh(ctx, granted.Key, repo, granted.Pull.Num, 0)
	var notOwner *client.NotOwnerError
	var invalid *client.InvalidError
	if errors.As(err, &invalid) && invalid.Status == http.StatusConflict {
		// No lock-ttl to renew to: a lock granted now has no lease, and neither does this
		// one from now on. Its lease was a hold-over (UnlockIfOwnedByPull before the pull's
		// re-plan) or a caller's ttl; left on, it would end under the command.
		renewed, err = b.service.EndLease(ctx, granted.Key, repo, granted.Pull.Num)
		if errors.As(err, &invalid) && invalid.Status == http.StatusUnprocessableEntity && invalid.Field == "ttl" {
			// A service of the release before refresh took a ttl of 0s: it cannot end a
			// lease, so it gets no hold-over from now on (UnlockIfOwnedByPull frees at once).
			b.noLeaseEnd.Store(true)
			return fmt.Errorf("the %w: %w", errLeaseCannotEnd, err)
		}
	}
	switch {
	case errors.As(err, &notOwner) && notOwner.Holder != nil &&
		notOwner.Holder.Project.RepoFullName == repo && notOwner.Holder.Pull.Num == granted.Pull.Num:
		return nil
	case errors.As(err, &notOwner):
		return fmt.Errorf("the lease of %s %w: %w", granted.Key, errLeaseRanOut, &client.HeldError{
			Key: granted.Key, Reason: client.ReasonHeld, Holder: notOwner.Holder,
			Message: "the lease ended before it could be renewed, and another pull took the lock"})
	case errors.As(err, &invalid) && invalid.Status == http.StatusConflict:
		return nil
	case err != nil:
		return fmt.Errorf("renewing the lease of %s: %w", granted.Key, err)
	case renewed == nil:
		return fmt.Errorf("the lease of %s %w", granted.Key, errLeaseRanOut)
	}
	return nil
}

// Unlock frees the lock whoever holds it; nil when there was none. Atlantis gives it the
// parts of a key its lock page split (see pageKey).
func (b *Database) Unlock(p models.Project, workspace string) (*models.ProjectLock, error) {
	ctx, cancel := b.ctx(0)
	defer cancel()
	lock, err := b.service.Release(ctx, pageKey(p, workspace))
	return optional(lock, err)
}

// UnlockIfOwnedByPull frees the lock only if pullNum of the project's repository holds it;
// nil, and the lock kept, otherwise — also when the key's holder is a project of another
// repository whose pull has that number (Atlantis calls this for every project of a pull
// before each plan). With a hold-over (WithHoldOver) the lock is not freed at once but kept
// for its pull with a lease of the hold-over, which its next TryLock ends; a lock on the
// service's legacy side, which has no lease and no queue, is freed at once.
func (b *Database) UnlockIfOwnedByPull(p models.Project, workspace string, pullNum int) (*models.ProjectLock, error) {
	ctx, cancel := b.ctx(0)
	defer cancel()
	k := key(p, workspace)
	var notOwner *client.NotOwnerError
	if b.holdOver > 0 && !b.noLeaseEnd.Load() {
		lock, err := b.service.Refresh(ctx, k, p.RepoFullName, pullNum, b.holdOver)
		var invalid *client.InvalidError
		switch {
		case errors.As(err, &notOwner):
			return nil, nil
		case !errors.As(err, &invalid) || invalid.Status != http.StatusConflict:
			return optional(lock, err)
		}
	}
	lock, err := b.service.ReleaseIfOwnedIn(ctx, k, p.RepoFullName, pullNum)
	if errors.As(err, &notOwner) {
		return nil, nil
	}
	return optional(lock, err)
}

// List is every lock the service holds. A lock store behind the service that did not
// answer is an error (an *UnavailableError naming it), not a shorter list: Atlantis's lock
// pages then say the locks could not be read rather than show some of them as all. So is a
// stored lock that cannot be read (an *UnreadableError naming its key), as Atlantis's own
// databases fail a List on a lock they cannot decode.
func (b *Database) List() ([]models.ProjectLock, error) {
	ctx, cancel := b.ctx(0)
	defer cancel()
	locks, err := b.service.List(ctx, client.ListFilter{})
	if err != nil {
		return nil, fromService(err)
	}
	return projectLocks(locks), nil
}

// GetLock is the lock on the project and workspace; nil when there is none. Atlantis gives it
// the parts of a key its lock page split (see pageKey).
func (b *Database) GetLock(p models.Project, workspace string) (*models.ProjectLock, error) {
	ctx, cancel := b.ctx(0)
	defer cancel()
	lock, err := b.service.Get(ctx, pageKey(p, workspace))
	return optional(lock, err)
}

// UnlockByPull frees every lock of the pull of exactly that repository. Atlantis's own
// databases match the repository by prefix (closing PR 5 of org/app also frees PR 5 of
// org/app-infra); the service does not. When a lock store behind the service did not
// answer (the enhanced one during a migration), the locks freed on the other come back with
// an error (an *UnavailableError naming the store): the pull's locks there are still held.
func (b *Database) UnlockByPull(repoFullName string, pullNum int) ([]models.ProjectLock, error) {
	ctx, cancel := b.ctx(0)
	defer cancel()
	locks, err := b.service.ReleasePull(ctx, repoFullName, pullNum)
	if err != nil {
		return projectLocks(locks), fromService(err)
	}
	return projectLocks(locks), nil
}

func (b *Database) UpdateProjectStatus(pull models.PullRequest, workspace string, repoRelDir string, newStatus models.ProjectPlanStatus) error {
	return b.wrapped.UpdateProjectStatus(pull, workspace, repoRelDir, newStatus)
}

func (b *Database) GetPullStatus(pull models.PullRequest) (*models.PullStatus, error) {
	return b.wrapped.GetPullStatus(pull)
}

func (b *Database) DeletePullStatus(pull models.PullRequest) error {
	return b.wrapped.DeletePullStatus(pull)
}

func (b *Database) UpdatePullWithResults(pull models.PullRequest, newResults []command.ProjectResult) (models.PullStatus, error) {
	return b.wrapped.UpdatePullWithResults(pull, newResults)
}

func (b *Database) LockCommand(cmdName command.Name, lockTime time.Time) (*command.Lock, error) {
	return b.wrapped.LockCommand(cmdName, lockTime)
}

func (b *Database) UnlockCommand(cmdName command.Name) error {
	return b.wrapped.UnlockCommand(cmdName)
}

func (b *Database) CheckCommandLock(cmdName command.Name) (*command.Lock, error) {
	return b.wrapped.CheckCommandLock(cmdName)
}

// Ping checks that the service answers (GET /readyz), then the wrapped database. Atlantis's
// /readyz is this Ping: a store of the service that does not answer (the service's 503
// naming it) is not an error here, nor is a service that withholds its locks for now (its
// 503 saying why). Every Atlantis replica shares the service, so that would mark them all
// not ready at once — no webhook taken, no page shown — while the
// fall-back serves the locks, and each lock call fails closed on its own where nothing can.
// The stores' state is the service's own readiness (client.Ready).
//
// A service that does not know this Atlantis's token (missing, wrong, expired: its 401 to
// client.Known) fails Ping: every lock call would fail, and the fault is this replica's own
// configuration, not the shared service's. A replica started with it is not ready, so a
// rollout carrying a wrong token stops at its first new replica while the old ones go on
// serving. A token the service no longer accepts marks the replicas that send it not ready,
// as Atlantis's /readyz says of a database it cannot use. A token the service knows but whose
// role may not lock is not seen here (only a lock call says that).
func (b *Database) Ping() error {
	window := PingWindow
	if b.timeout > 0 && b.timeout < window {
		window = b.timeout
	}
	ctx, cancel := context.WithTimeout(context.Background(), window)
	defer cancel()
	var unavailable *client.UnavailableError
	if err := b.service.Ready(ctx); err != nil && !(errors.As(err, &unavailable) &&
		(len(unavailable.Sides) > 0 || unavailable.Withheld != "")) {
		return fromService(err)
	}
	var denied *client.DeniedError
	if err := b.service.Known(ctx); errors.As(err, &denied) {
		return fromService(err)
	}
	return b.wrapped.Ping()
}

// PingWindow bounds Ping, which Atlantis serves as its /readyz: a probe is answered within it
// (the lock calls, bounded by WithTimeout, wait out a restarting service for longer). A
// service restart shorter than it leaves Atlantis ready; a service gone makes it not ready
// within it, not after the 30s of a lock call, and probes do not pile up meanwhile.
const PingWindow = 3 * time.Second

// Close closes the wrapped database (the service keeps running).
func (b *Database) Close() error { return b.wrapped.Close() }

// fromService is a lock method's error from the service client: named as the lock service's,
// unless its own words name it already (the service unavailable, a refusal of the caller, a
// lease this service cannot end), so that what Atlantis shows ("acquiring lock: ...") says it
// once. Told by the error's type, not its words: a key or a message of the service may
// contain "lock service" too.
func fromService(err error) error {
	var unavailable *client.UnavailableError
	var denied *client.DeniedError
	if errors.As(err, &unavailable) || errors.As(err, &denied) || errors.Is(err, errLeaseCannotEnd) {
		return err
	}
	return fmt.Errorf("lock service: %w", err)
}

func optional(lock *client.Lock, err error) (*models.ProjectLock, error) {
	if err != nil {
		return nil, fromService(err)
	}
	if lock == nil {
		return nil, nil
	}
	converted := projectLock(*lock)
	return &converted, nil
}
