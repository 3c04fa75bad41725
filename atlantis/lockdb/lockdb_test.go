package lockdb_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/runatlantis/atlantis/server/core/boltdb"
	"github.com/runatlantis/atlantis/server/core/config/valid"
	"github.com/runatlantis/atlantis/server/core/locking"
	"github.com/runatlantis/atlantis/server/events/command"
	"github.com/runatlantis/atlantis/server/events/models"
	"github.com/runatlantis/atlantis/server/events/vcs"
	"github.com/runatlantis/atlantis/server/events/vcs/bitbucketserver"
	"github.com/runatlantis/atlantis/server/events/vcs/github"
	"github.com/runatlantis/atlantis/server/logging"

	"github.com/runatlantis/enhanced-locking/atlantis/client"
	"github.com/runatlantis/enhanced-locking/atlantis/internal/servicetest"
	"github.com/runatlantis/enhanced-locking/atlantis/lockdb"
)

// store is one way to run the service: its default embedded store, or Redis (where the
// legacy store speaks Atlantis's own Redis layout).
type store struct {
	name  string
	serve func(t *testing.T, extra ...string) *servicetest.Service
}

var stores = []store{
	{"embedded", func(t *testing.T, extra ...string) *servicetest.Service {
		return servicetest.Serve(t, extra...)
	}},
	{"redis", func(t *testing.T, extra ...string) *servicetest.Service {
		return servicetest.Serve(t, append(servicetest.RedisArgs(servicetest.Redis(t)), extra...)...)
	}},
}

func forEachStore(t *testing.T, test func(t *testing.T, s store)) {
	for _, s := range stores {
		t.Run(s.name, func(t *testing.T) { test(t, s) })
	}
}

// open is the adapter on svc, wrapping Atlantis's own BoltDB for pull statuses and command
// locks, once its Ping answers.
func open(t *testing.T, svc *servicetest.Service, opts ...lockdb.Option) *lockdb.Database {
	t.Helper()
	database := open2(t, svc, opts...)
	if err := database.Ping(); err != nil {
		t.Fatalf("ping: %v", err)
	}
	return database
}

// openAt is the adapter on the service at url, wrapping Atlantis's own BoltDB, without a
// Ping (the service may not answer); closed when the test ends.
func openAt(t *testing.T, url string, opts ...lockdb.Option) *lockdb.Database {
	t.Helper()
	wrapped, err := boltdb.New(t.TempDir())
	must(t, err)
	database, err := lockdb.New(url, wrapped, opts...)
	must(t, err)
	t.Cleanup(func() { database.Close() }) //nolint:errcheck
	return database
}

func pullOf(repo string, num int) models.PullRequest {
	owner, name := models.SplitRepoFullName(repo)
	return models.PullRequest{
		Num: num, HeadCommit: fmt.Sprintf("c0ffee%d", num), URL: fmt.Sprintf("https://github.com/%s/pull/%d", repo, num),
		HeadBranch: fmt.Sprintf("feature-%d", num), BaseBranch: "main", Author: "alice",
		State: models.OpenPullState,
		BaseRepo: models.Repo{FullName: repo, Owner: owner, Name: name,
			VCSHost: models.VCSHost{Hostname: "github.com", Type: models.Github}},
	}
}

var alice = models.User{Username: "alice", Teams: []string{"platform", "sre"}}

func TestAtlantisLockingClientRunsAgainstTheService(t *testing.T) {
	forEachStore(t, func(t *testing.T, s store) {
		database := open(t, s.serve(t))
		locker := locking.NewClient(database)
		project := models.NewProject("acme/infra", "envs/prod/", "prod")

		got, err := locker.TryLock(project, "default", pullOf("acme/infra", 12), alice)
		must(t, err)
		if !got.LockAcquired || got.LockKey != "acme/infra/envs/prod/default/prod" {
			t.Fatalf("pull 12 should get acme/infra/envs/prod/default/prod, got %+v", got)
		}
		// The same pull asking again keeps its lock; another pull is told who holds it.
		again, err := locker.TryLock(project, "default", pullOf("acme/infra", 12), alice)
		must(t, err)
		if !again.LockAcquired {
			t.Fatalf("the holder asking again should keep its lock, got %+v", again)
		}
		other, err := locker.TryLock(project, "default", pullOf("acme/infra", 13), alice)
		must(t, err)
		if other.LockAcquired || other.CurrLock.Pull.Num != 12 {
			t.Fatalf("pull 13 should be refused with pull 12 as holder, got %+v", other)
		}

		all, err := locker.List()
		must(t, err)
		held, ok := all[got.LockKey]
		if len(all) != 1 || !ok {
			t.Fatalf("List should hold exactly %s, got %v", got.LockKey, all)
		}
		if held.Pull.Num != 12 || held.User.Username != "alice" || held.Project != project {
			t.Fatalf("listed lock has the wrong fields: %+v", held)
		}
		byKey, err := locker.GetLock(got.LockKey)
		must(t, err)
		if byKey == nil || byKey.Pull.Num != 12 {
			t.Fatalf("GetLock(%s) = %+v", got.LockKey, byKey)
		}

		freed, err := locker.Unlock(got.LockKey)
		must(t, err)
		if freed == nil || freed.Pull.Num != 12 {
			t.Fatalf("Unlock should answer pull 12's lock, got %+v", freed)
		}
		gone, err := locker.GetLock(got.LockKey)
		must(t, err)
		if gone != nil {
			t.Fatalf("the lock should be gone, got %+v", gone)
		}

		// UnlockByPull frees every lock of the pull, and only those.
		for _, path := range []string{"envs/a", "envs/b"} {
			r, err := locker.TryLock(models.NewProject("acme/infra", path, ""), "default", pullOf("acme/infra", 20), alice)
			must(t, err)
			if !r.LockAcquired {
				t.Fatalf("pull 20 should get %s", path)
			}
		}
		r, err := locker.TryLock(models.NewProject("acme/infra", "envs/c", ""), "default", pullOf("acme/infra", 21), alice)
		must(t, err)
		if !r.LockAcquired {
			t.Fatal("pull 21 should get envs/c")
		}
		released, err := locker.UnlockByPull("acme/infra", 20)
		must(t, err)
		if len(released) != 2 {
			t.Fatalf("UnlockByPull(acme/infra, 20) should free 2 locks, freed %+v", released)
		}
		left, err := locker.List()
		must(t, err)
		if _, ok := left["acme/infra/envs/c/default/"]; len(left) != 1 || !ok {
			t.Fatalf("only pull 21's lock should remain, got %v", left)
		}
	})
}

func TestAtlantisRunsWithoutAPullLockAndReleaseByTheirNegativeNumber(t *testing.T) {
	// Atlantis's /api/plan, /api/apply and drift runs have no pull request: it numbers each
	// with a made-up negative pull (api_controller.go, nextNonPRPullNum), as low as -2^30
	// less a counter. Its own BoltDB and Redis take any number; the service must too.
	const apiRun = -536870977
	forEachStore(t, func(t *testing.T, s store) {
		database := open(t, s.serve(t))
		locker := locking.NewClient(database)
		api := models.NewProject("acme/infra", "envs/api", "")
		got, err := locker.TryLock(api, "default", pullOf("acme/infra", apiRun), alice)
		must(t, err)
		if !got.LockAcquired {
			t.Fatalf("the run without a pull should get its lock, got %+v", got)
		}
		// The pull with the same digits is another owner.
		other, err := locker.TryLock(models.NewProject("acme/infra", "envs/pr", ""), "default",
			pullOf("acme/infra", -apiRun), alice)
		must(t, err)
		if !other.LockAcquired {
			t.Fatalf("pull %d should get its own lock, got %+v", -apiRun, other)
		}
		refused, err := locker.TryLock(api, "default", pullOf("acme/infra", -apiRun), alice)
		must(t, err)
		if refused.LockAcquired || refused.CurrLock.Pull.Num != apiRun {
			t.Fatalf("pull %d should be told the run %d holds it, got %+v", -apiRun, apiRun, refused)
		}
		held, err := database.GetLock(api, "default")
		must(t, err)
		if held == nil || held.Pull.Num != apiRun {
			t.Fatalf("GetLock should answer the run's lock, got %+v", held)
		}
		all, err := database.List()
		must(t, err)
		if len(all) != 2 {
			t.Fatalf("List should hold both locks, got %+v", all)
		}
		released, err := database.UnlockByPull("acme/infra", apiRun)
		must(t, err)
		if len(released) != 1 || released[0].Pull.Num != apiRun || released[0].Project.Path != "envs/api" {
			t.Fatalf("UnlockByPull(%d) should free the run's lock only, freed %+v", apiRun, released)
		}
		left, err := database.List()
		must(t, err)
		if len(left) != 1 || left[0].Pull.Num != -apiRun {
			t.Fatalf("pull %d's lock should remain, got %+v", -apiRun, left)
		}
	})
}

func TestEveryFieldOfAProjectLockSurvivesTheRoundTrip(t *testing.T) {
	forEachStore(t, func(t *testing.T, s store) {
		database := open(t, s.serve(t))
		want := models.ProjectLock{
			Project:   models.NewProject("acme/platform/infra", "modules/net", "net"),
			Workspace: "staging",
			Pull:      pullOf("acme/platform/infra", 7),
			User:      alice,
			Time:      time.Now(),
		}
		want.Pull.BaseRepo.VCSHost = models.VCSHost{Hostname: "gitlab.example.com", Type: models.Gitlab}
		want.Pull.URL = "https://gitlab.example.com/acme/platform/infra/-/merge_requests/7"
		acquired, _, err := database.TryLock(want)
		must(t, err)
		if !acquired {
			t.Fatal("the lock should be granted")
		}
		got, err := database.GetLock(want.Project, want.Workspace)
		must(t, err)
		if got == nil {
			t.Fatal("GetLock found nothing")
		}
		if got.Project != want.Project || got.Workspace != want.Workspace {
			t.Errorf("project/workspace: got %+v %q, want %+v %q", got.Project, got.Workspace, want.Project, want.Workspace)
		}
		if fmt.Sprint(got.User) != fmt.Sprint(want.User) {
			t.Errorf("user: got %+v, want %+v", got.User, want.User)
		}
		if fmt.Sprintf("%+v", got.Pull) != fmt.Sprintf("%+v", want.Pull) {
			t.Errorf("pull:\n got %+v\nwant %+v", got.Pull, want.Pull)
		}
		if d := got.Time.Sub(want.Time); d < -time.Second || d > 5*time.Second {
			t.Errorf("time: got %v, want about %v (the grant time)", got.Time, want.Time)
		}
	})
}

func TestABitbucketServerLockKeepsItsCloneURLWithoutCredentials(t *testing.T) {
	// After an unlock from its UI, Atlantis comments on the lock's pull through the client of
	// its VCS host; Bitbucket Server's finds the project key in BaseRepo.SanitizedCloneURL.
	// The lock keeps that URL, without the user:<redacted>@ Atlantis puts in it; never the
	// CloneURL with the token.
	forEachStore(t, func(t *testing.T, s store) {
		database := open(t, s.serve(t))
		lock := models.ProjectLock{Project: models.NewProject("at/infra", ".", ""), Workspace: "default",
			Pull: pullOf("at/infra", 3), User: alice, Time: time.Now()}
		lock.Pull.URL = "https://bitbucket.corp:7990/projects/AT/repos/infra/pull-requests/3"
		lock.Pull.BaseRepo.VCSHost = models.VCSHost{Hostname: "bitbucket.corp", Type: models.BitbucketServer}
		lock.Pull.BaseRepo.CloneURL = "https://atlantis-bot:s3cret-token@bitbucket.corp:7990/scm/at/infra.git"
		lock.Pull.BaseRepo.SanitizedCloneURL = "https://atlantis-bot:<redacted>@bitbucket.corp:7990/scm/at/infra.git"
		ok, _, err := database.TryLock(lock)
		must(t, err)
		if !ok {
			t.Fatal("the lock should be granted")
		}
		got, err := database.GetLock(lock.Project, "default")
		must(t, err)
		if got == nil || got.Pull.BaseRepo.SanitizedCloneURL != "https://bitbucket.corp:7990/scm/at/infra.git" {
			t.Fatalf("the clone URL should come back without credentials, got %+v", got)
		}
		if got.Pull.BaseRepo.CloneURL != "" {
			t.Fatalf("the clone URL with the token must not be kept, got %q", got.Pull.BaseRepo.CloneURL)
		}
		key, err := (&bitbucketserver.Client{}).GetProjectKey(got.Pull.BaseRepo.Name, got.Pull.BaseRepo.SanitizedCloneURL)
		must(t, err)
		if key != "at" {
			t.Fatalf("Atlantis's Bitbucket Server client should read project key at, read %q", key)
		}
		listed, err := database.Client().List(context.Background(), client.ListFilter{})
		must(t, err)
		if text := fmt.Sprintf("%+v", listed); strings.Contains(text, "s3cret") || strings.Contains(text, "atlantis-bot") {
			t.Fatalf("credentials reached the service: %s", text)
		}
	})
}

func TestPathsAreCleanedAsAtlantisCleansThem(t *testing.T) {
	database := open(t, servicetest.Serve(t))
	first := models.ProjectLock{Project: models.Project{RepoFullName: "acme/infra", Path: "envs/net/"},
		Workspace: "default", Pull: models.PullRequest{Num: 1}, User: alice, Time: time.Now()}
	second := first
	second.Project.Path = "./envs/net"
	second.Pull.Num = 2
	ok, _, err := database.TryLock(first)
	must(t, err)
	if !ok {
		t.Fatal("pull 1 should get envs/net/")
	}
	ok, holder, err := database.TryLock(second)
	must(t, err)
	if ok || holder.Pull.Num != 1 {
		t.Fatalf("./envs/net is the same project as envs/net/: pull 2 must be refused, got %v %+v", ok, holder)
	}
}

func TestAtlantisProjectLockerSaysWhoHoldsTheLock(t *testing.T) {
	forEachStore(t, func(t *testing.T, s store) {
		database := open(t, s.serve(t))
		locker := projectLocker(database, &github.Client{})
		log := logging.NewNoopLogger(t)
		project := models.NewProject("acme/infra", "envs/prod", "")

		first, err := locker.TryLock(log, pullOf("acme/infra", 1), alice, "default", project, true)
		must(t, err)
		if !first.LockAcquired {
			t.Fatalf("pull 1 should get the lock: %+v", first)
		}
		second, err := locker.TryLock(log, pullOf("acme/infra", 2), alice, "default", project, true)
		must(t, err)
		want := "This project is currently locked by an unapplied plan from pull #1."
		if second.LockAcquired || !strings.Contains(second.LockFailureReason, want) {
			t.Fatalf("pull 2 should read %q, got %+v", want, second)
		}
		// Pull 1's unlock function frees it only while pull 1 holds it.
		must(t, first.UnlockFn())
		third, err := locker.TryLock(log, pullOf("acme/infra", 2), alice, "default", project, true)
		must(t, err)
		if !third.LockAcquired {
			t.Fatalf("pull 2 should get the lock once pull 1 let go: %+v", third)
		}
		must(t, first.UnlockFn()) // pull 1's stale unlock must not free pull 2's lock
		held, err := database.GetLock(project, "default")
		must(t, err)
		if held == nil || held.Pull.Num != 2 {
			t.Fatalf("pull 2 should still hold the lock, got %+v", held)
		}
	})
}

// gitlabPull is merge request num of a GitLab repository, as Atlantis builds it.
func gitlabPull(repo string, num int) models.PullRequest {
	owner, name := models.SplitRepoFullName(repo)
	return models.PullRequest{Num: num, URL: fmt.Sprintf("https://gitlab.com/%s/-/merge_requests/%d", repo, num),
		HeadCommit: "c0ffee", HeadBranch: "feature", BaseBranch: "main", Author: "alice", State: models.OpenPullState,
		BaseRepo: models.Repo{FullName: repo, Owner: owner, Name: name,
			VCSHost: models.VCSHost{Hostname: "gitlab.com", Type: models.Gitlab}}}
}

func TestAProjectOfAnotherRepositoryWithTheSameKeyIsAnErrorNotAGrant(t *testing.T) {
	// GitLab's grp/sub with dir proj/x and grp/sub/proj with dir x build the same lock key,
	// and both can have merge request !5. Atlantis's project locker reads "not acquired, held
	// by pull 5" as acquired when it asks for pull 5: the refusal must be an error instead.
	forEachStore(t, func(t *testing.T, s store) {
		database := open(t, s.serve(t))
		locker := projectLocker(database, &github.Client{})
		log := logging.NewNoopLogger(t)
		mine, theirs := models.NewProject("grp/sub", "proj/x", ""), models.NewProject("grp/sub/proj", "x", "")
		first, err := locker.TryLock(log, gitlabPull("grp/sub", 5), alice, "default", mine, true)
		must(t, err)
		if !first.LockAcquired {
			t.Fatalf("grp/sub !5 should get the lock: %+v", first)
		}
		second, err := locker.TryLock(log, gitlabPull("grp/sub/proj", 5), alice, "default", theirs, true)
		var held *client.HeldError
		if err == nil || !errors.As(err, &held) || held.Reason != client.ReasonCollision {
			t.Fatalf("grp/sub/proj !5 must get a collision error, got %+v, %v", second, err)
		}
		if !strings.Contains(err.Error(), "grp/sub") {
			t.Fatalf("the error should name the holder's repository: %v", err)
		}
		stillHeldBy(t, database, mine, "grp/sub", 5)
	})
}

func TestAPlanOfAnotherRepositoryWithTheSameKeyLeavesTheHoldersLock(t *testing.T) {
	// Every plan first drops the pull's earlier plan locks (plan_command_runner.go,
	// deletePlansAndPlanLocks): UnlockIfOwnedByPull of each of its projects with its own pull
	// number. The project x of grp/sub/proj !5 has the key of grp/sub !5's project proj/x:
	// that call must leave grp/sub's lock held, or the plan that follows it is granted the key
	// while grp/sub !5 still holds its plan.
	forEachStore(t, func(t *testing.T, s store) {
		database := open(t, s.serve(t))
		locker := locking.NewClient(database)
		mine, theirs := models.NewProject("grp/sub", "proj/x", ""), models.NewProject("grp/sub/proj", "x", "")
		first, err := locker.TryLock(mine, "default", gitlabPull("grp/sub", 5), alice)
		must(t, err)
		if !first.LockAcquired {
			t.Fatalf("grp/sub !5 should get the lock: %+v", first)
		}
		freed, err := locker.UnlockIfOwnedByPull(theirs, "default", 5)
		must(t, err)
		if freed != nil {
			t.Fatalf("grp/sub/proj !5 must not free grp/sub !5's lock, freed %+v", freed)
		}
		stillHeldBy(t, database, mine, "grp/sub", 5)
		again, err := locker.TryLock(theirs, "default", gitlabPull("grp/sub/proj", 5), alice)
		if err == nil || again.LockAcquired {
			t.Fatalf("grp/sub/proj !5 must still be refused the key, got %+v, %v", again, err)
		}
		// The holder's own call frees it.
		freed, err = locker.UnlockIfOwnedByPull(mine, "default", 5)
		must(t, err)
		if freed == nil || freed.Project.RepoFullName != "grp/sub" || freed.Pull.Num != 5 {
			t.Fatalf("grp/sub !5's own call should free its lock, got %+v", freed)
		}
	})
}

func TestAtlantisLockPagesFindTheRootProjectOfARepositoryOfThreeParts(t *testing.T) {
	// Atlantis's lock pages (GET /lock?id=, the discard button's DELETE /locks?id=) hand the
	// key to locking.Client, which splits it at the second slash (locking.go, keyRegex): the
	// root project of GitLab's grp/sub/proj (or Azure DevOps's org/project/repo), key
	// grp/sub/proj/./default/, comes to GetLock and Unlock as repository grp/sub with path
	// proj/. — which must name that key again, not grp/sub/proj/default/.
	forEachStore(t, func(t *testing.T, s store) {
		database := open(t, s.serve(t))
		locker := locking.NewClient(database)
		got, err := locker.TryLock(models.NewProject("grp/sub/proj", ".", ""), "default", gitlabPull("grp/sub/proj", 7), alice)
		must(t, err)
		if !got.LockAcquired || got.LockKey != "grp/sub/proj/./default/" {
			t.Fatalf("!7 should get grp/sub/proj/./default/, got %+v", got)
		}
		all, err := locker.List()
		must(t, err)
		if _, ok := all[got.LockKey]; len(all) != 1 || !ok {
			t.Fatalf("the lock page should list %s, got %v", got.LockKey, all)
		}
		page, err := locker.GetLock(got.LockKey)
		must(t, err)
		if page == nil || page.Pull.Num != 7 || page.Project.RepoFullName != "grp/sub/proj" {
			t.Fatalf("the lock's page should find !7's lock, got %+v", page)
		}
		freed, err := locker.Unlock(got.LockKey)
		must(t, err)
		if freed == nil || freed.Pull.Num != 7 || freed.Project.Path != "." {
			t.Fatalf("discarding the lock should free !7's lock, got %+v", freed)
		}
		gone, err := locker.GetLock(got.LockKey)
		must(t, err)
		if gone != nil {
			t.Fatalf("the lock should be gone, got %+v", gone)
		}
	})
}

func TestAtlantisLockPagesFindAProjectWhoseNameHasASlash(t *testing.T) {
	// Atlantis allows a '/' in a project's name (named after its directory, raw/project.go,
	// validProjectName) and its lock pages split the key with a greedy path (locking.go,
	// keyRegex): the root project "team/app" of acme/infra, key acme/infra/./default/team/app,
	// comes to GetLock and Unlock as path "./default", workspace "team", name "app". Those
	// parts, joined as Atlantis joins them, name the key again; the path cleaned would not
	// ("default"), and the page would find no lock.
	forEachStore(t, func(t *testing.T, s store) {
		database := open(t, s.serve(t))
		locker := locking.NewClient(database)
		for i, p := range []models.Project{
			models.NewProject("acme/infra", ".", "team/app"),
			models.NewProject("acme/infra", "envs/prod", "envs/prod"),
			models.NewProject("grp/sub/proj", ".", "team/app"),
			models.NewProject("acme/infra", "envs/qa", "team/../app"),
		} {
			num := 10 + i
			got, err := locker.TryLock(p, "default", gitlabPull(p.RepoFullName, num), alice)
			must(t, err)
			if !got.LockAcquired || got.LockKey != models.GenerateLockKey(p, "default") {
				t.Fatalf("pull %d should get %s, got %+v", num, models.GenerateLockKey(p, "default"), got)
			}
			all, err := locker.List()
			must(t, err)
			if _, ok := all[got.LockKey]; !ok {
				t.Fatalf("the lock page should list %s, got %v", got.LockKey, all)
			}
			page, err := locker.GetLock(got.LockKey)
			must(t, err)
			if page == nil || page.Pull.Num != num || page.Project != p {
				t.Fatalf("the page of %s should find pull %d's lock, got %+v", got.LockKey, num, page)
			}
			freed, err := locker.Unlock(got.LockKey)
			must(t, err)
			if freed == nil || freed.Pull.Num != num {
				t.Fatalf("discarding %s should free pull %d's lock, got %+v", got.LockKey, num, freed)
			}
			gone, err := locker.GetLock(got.LockKey)
			must(t, err)
			if gone != nil {
				t.Fatalf("%s should be free, got %+v", got.LockKey, gone)
			}
		}
	})
}

func TestAHolderWithoutAVCSHostIsLinkedThroughTheAskingPullsHost(t *testing.T) {
	// A lock taken by a caller other than Atlantis (the CLI, a pipeline) has no VCS host.
	// Atlantis links the holder's pull through the client of its BaseRepo's host type: an
	// empty one reads as GitHub, an error on an Atlantis without GitHub, so the plan failed
	// instead of saying who holds the lock. The holder gets the asking lock's host.
	database := open(t, servicetest.Serve(t))
	other, err := client.New(database.Client().URL())
	must(t, err)
	_, err = other.Acquire(context.Background(), client.AcquireRequest{
		Project: client.Project{RepoFullName: "grp/infra", Path: "."}, Workspace: "default",
		Pull: client.Pull{Num: 9}, User: client.User{Username: "pipeline"}})
	must(t, err)
	// An Atlantis set up for Bitbucket Server only.
	locker := projectLocker(database, vcs.NewClientProxy(nil, nil, nil, &bitbucketserver.Client{}, nil, nil))
	mr := models.PullRequest{Num: 5, URL: "https://bitbucket.corp/projects/GRP/repos/infra/pull-requests/5",
		HeadCommit: "c0ffee", HeadBranch: "feature", BaseBranch: "main", Author: "alice", State: models.OpenPullState,
		BaseRepo: models.Repo{FullName: "grp/infra", Owner: "grp", Name: "infra",
			VCSHost: models.VCSHost{Hostname: "bitbucket.corp", Type: models.BitbucketServer}}}
	got, err := locker.TryLock(logging.NewNoopLogger(t), mr, alice, "default", models.NewProject("grp/infra", ".", ""), true)
	must(t, err)
	if got.LockAcquired || !strings.Contains(got.LockFailureReason, "locked by an unapplied plan from pull #9") {
		t.Fatalf("pull 5 should be told pull 9 holds the lock, got %+v", got)
	}
}

func TestAtlantisApplyLockStaysInTheWrappedDatabase(t *testing.T) {
	database := open(t, servicetest.Serve(t))
	apply := locking.NewApplyClient(database, false, false)
	state, err := apply.CheckApplyLock()
	must(t, err)
	if state.Locked {
		t.Fatal("no apply lock yet")
	}
	locked, err := apply.LockApply()
	must(t, err)
	if !locked.Locked {
		t.Fatal("LockApply should lock")
	}
	// It is the wrapped database's command lock, not a project lock in the service.
	inWrapped, err := database.Wrapped().CheckCommandLock(command.Apply)
	must(t, err)
	if inWrapped == nil || !inWrapped.IsLocked() {
		t.Fatal("the apply lock should live in the wrapped database")
	}
	locks, err := database.List()
	must(t, err)
	if len(locks) != 0 {
		t.Fatalf("the apply lock is not a project lock: %+v", locks)
	}
	must(t, apply.UnlockApply())
	state, err = apply.CheckApplyLock()
	must(t, err)
	if state.Locked {
		t.Fatal("UnlockApply should unlock")
	}
}

// grant is one holding seen by a client: from after its acquire answered to before its
// release was sent. That interval lies inside the real holding, so two of one key that
// overlap are two real holdings that overlapped: a lock granted twice.
type grant struct {
	pull       int
	start, end time.Time
}

func TestManyGoroutinesThroughAtlantisClientNeverShareALock(t *testing.T) {
	forEachStore(t, func(t *testing.T, s store) {
		database := open(t, s.serve(t))
		locker := locking.NewClient(database)
		const workers, rounds = 24, 8
		projects := []models.Project{models.NewProject("acme/infra", "envs/prod", ""), models.NewProject("acme/infra", "envs/dev", "")}
		var mu sync.Mutex
		history := map[string][]grant{}
		var inside [2]atomic.Int32
		var overlaps, refusals atomic.Int32
		var wg sync.WaitGroup
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				for r := 0; r < rounds; r++ {
					i := (w + r) % len(projects)
					pull := pullOf("acme/infra", 100+w)
					got, err := locker.TryLock(projects[i], "default", pull, alice)
					if err != nil {
						t.Errorf("worker %d: %v", w, err)
						return
					}
					if !got.LockAcquired {
						refusals.Add(1)
						continue
					}
					start := time.Now()
					if inside[i].Add(1) != 1 {
						overlaps.Add(1)
					}
					time.Sleep(time.Millisecond)
					inside[i].Add(-1)
					end := time.Now()
					if _, err := locker.UnlockIfOwnedByPull(projects[i], "default", pull.Num); err != nil {
						t.Errorf("worker %d: unlock: %v", w, err)
						return
					}
					mu.Lock()
					history[got.LockKey] = append(history[got.LockKey], grant{pull.Num, start, end})
					mu.Unlock()
				}
			}(w)
		}
		wg.Wait()
		if overlaps.Load() != 0 {
			t.Fatalf("%d times two goroutines held one lock at once", overlaps.Load())
		}
		grants := 0
		for key, gs := range history {
			grants += len(gs)
			for i := range gs {
				for j := i + 1; j < len(gs); j++ {
					if gs[i].start.Before(gs[j].end) && gs[j].start.Before(gs[i].end) {
						t.Fatalf("%s granted twice: pull %d and pull %d held it at once", key, gs[i].pull, gs[j].pull)
					}
				}
			}
		}
		if grants == 0 || refusals.Load() == 0 {
			t.Fatalf("the case was not contended: %d grants, %d refusals", grants, refusals.Load())
		}
		t.Logf("%d grants, %d refusals, no lock held twice", grants, refusals.Load())
	})
}

func TestUnlockByPullMatchesTheRepositoryExactlyUnlikeAtlantis(t *testing.T) {
	// Atlantis's own databases free PR 5 of every repository whose name starts with the
	// closed one's; the service frees only the closed pull's repository.
	lockBoth := func(t *testing.T, database interface {
		TryLock(models.ProjectLock) (bool, models.ProjectLock, error)
	}) {
		for _, repo := range []string{"org/app", "org/app-infra"} {
			ok, _, err := database.TryLock(models.ProjectLock{Project: models.NewProject(repo, ".", ""),
				Workspace: "default", Pull: pullOf(repo, 5), User: alice, Time: time.Now()})
			must(t, err)
			if !ok {
				t.Fatalf("PR 5 of %s should get its lock", repo)
			}
		}
	}
	atlantisOwn, err := boltdb.New(t.TempDir())
	must(t, err)
	defer atlantisOwn.Close() //nolint:errcheck
	lockBoth(t, atlantisOwn)
	freedByAtlantis, err := atlantisOwn.UnlockByPull("org/app", 5)
	must(t, err)
	if len(freedByAtlantis) != 2 {
		t.Fatalf("Atlantis's BoltDB is expected to free both (prefix match), freed %d", len(freedByAtlantis))
	}

	database := open(t, servicetest.Serve(t))
	lockBoth(t, database)
	freed, err := database.UnlockByPull("org/app", 5)
	must(t, err)
	if len(freed) != 1 || freed[0].Project.RepoFullName != "org/app" {
		t.Fatalf("the service must free only org/app's lock, freed %+v", freed)
	}
	kept, err := database.GetLock(models.NewProject("org/app-infra", ".", ""), "default")
	must(t, err)
	if kept == nil || kept.Pull.Num != 5 {
		t.Fatalf("PR 5 of org/app-infra must keep its lock, got %+v", kept)
	}
}

func TestTheServiceUnreachableFailsClosed(t *testing.T) {
	svc := servicetest.Serve(t)
	// Each call waits out a refused connection for its bound (WithTimeout, 30s unless set; the
	// window's own test is in the client's tests): a short one here.
	database := open(t, svc, lockdb.WithTimeout(time.Second),
		lockdb.WithClientOptions(client.WithRetries(2, 10*time.Millisecond)))
	svc.Stop()
	lock := models.ProjectLock{Project: models.NewProject("acme/infra", ".", ""), Workspace: "default",
		Pull: pullOf("acme/infra", 1), User: alice, Time: time.Now()}
	ok, _, err := database.TryLock(lock)
	if ok || err == nil || !client.IsUnavailable(err) {
		t.Fatalf("TryLock with the service down must fail with an unavailable error, got %v %v", ok, err)
	}
	// Atlantis shows it as "acquiring lock: <it>": the lock service is named once.
	if said := err.Error(); strings.Count(said, "lock service") != 1 {
		t.Fatalf("the error should name the lock service once, got %q", said)
	}
	if _, err := database.List(); err == nil {
		t.Fatal("List with the service down must fail")
	}
	if _, err := database.Unlock(lock.Project, "default"); err == nil {
		t.Fatal("Unlock with the service down must fail")
	}
	if err := database.Ping(); err == nil {
		t.Fatal("Ping must check the service")
	}
	// The wrapped database still answers what it keeps.
	if _, err := database.CheckCommandLock(command.Apply); err != nil {
		t.Fatalf("command locks live in the wrapped database: %v", err)
	}
}

func TestAStoredLockThatCannotBeReadMakesListAnError(t *testing.T) {
	// A lock stored in a form nobody can read (a foreign or torn value at pr/{key} of the
	// Redis an Atlantis shares) still holds its key: nothing is granted on it until a
	// force-unlock clears it. The service lists it apart (unreadable); a List without it
	// would show the key free on Atlantis's lock pages, as Atlantis's own databases never do
	// (their List fails on a lock they cannot decode).
	addr := servicetest.Redis(t)
	database := open(t, servicetest.Serve(t, servicetest.RedisArgs(addr)...))
	ok, _, err := database.TryLock(models.ProjectLock{Project: models.NewProject("acme/infra", "readable", ""),
		Workspace: "default", Pull: pullOf("acme/infra", 1), User: alice, Time: time.Now()})
	must(t, err)
	if !ok {
		t.Fatal("pull 1 should get acme/infra/readable")
	}
	conn, err := net.Dial("tcp", addr)
	must(t, err)
	defer conn.Close() //nolint:errcheck
	_, err = conn.Write([]byte("SET pr/acme/infra/torn/default/ {not-a-lock\r\n"))
	must(t, err)
	reply := make([]byte, 5)
	_, err = io.ReadFull(conn, reply)
	must(t, err)
	if string(reply) != "+OK\r\n" {
		t.Fatalf("redis refused the SET: %q", reply)
	}
	listed, err := database.List()
	var unreadable *client.UnreadableError
	if !errors.As(err, &unreadable) || !slices.Equal(unreadable.Keys, []string{"acme/infra/torn/default/"}) ||
		!strings.Contains(err.Error(), "acme/infra/torn/default/") || !strings.Contains(err.Error(), "force-unlock") {
		t.Fatalf("List must be an error naming the unreadable lock, got %+v, %v", listed, err)
	}
	// The client's List answers the readable locks along with it.
	locks, err := database.Client().List(context.Background(), client.ListFilter{})
	if !errors.As(err, &unreadable) || len(locks) != 1 || locks[0].Project.Path != "readable" {
		t.Fatalf("the readable locks come along with the error, got %+v, %v", locks, err)
	}
}

func TestAPullsReleaseTheEnhancedStoreDidNotAnswerIsAnError(t *testing.T) {
	// In a migration the service answers a pull's release and a listing with what legacy
	// holds when the enhanced store is down, and says so (unavailable: ["enhanced"]). Atlantis
	// reads only the error: a partial release must not look like a whole one (its close
	// handler would never ask again, leaving the pull's enhanced locks held).
	redis := servicetest.RedisServer(t)
	svc := servicetest.Serve(t, "--enhanced-locking-enabled", "--enhanced-locking-backend=redis",
		"--enhanced-locking-redis-addr="+redis.Addr, "--enhanced-locking-fallback=legacy")
	database := open(t, svc, lockdb.WithClientOptions(client.WithRetries(1, 0)))
	lockAt := func(path string) {
		t.Helper()
		ok, _, err := database.TryLock(models.ProjectLock{Project: models.NewProject("acme/infra", path, ""),
			Workspace: "default", Pull: pullOf("acme/infra", 7), User: alice, Time: time.Now()})
		must(t, err)
		if !ok {
			t.Fatalf("pull 7 should get %s", path)
		}
	}
	lockAt("enhanced")
	redis.Stop()
	lockAt("legacy") // granted by legacy while the enhanced store is down (fallback legacy)

	listed, err := database.List()
	var unavailable *client.UnavailableError
	if !errors.As(err, &unavailable) || !slices.Equal(unavailable.Sides, []string{"enhanced"}) {
		t.Fatalf("List must say the enhanced store did not answer, got %+v, %v", listed, err)
	}
	released, err := database.UnlockByPull("acme/infra", 7)
	if !errors.As(err, &unavailable) || !slices.Equal(unavailable.Sides, []string{"enhanced"}) {
		t.Fatalf("UnlockByPull must say the enhanced store did not answer, got %+v, %v", released, err)
	}
	// What legacy held it did free, and says so along with the error.
	if len(released) != 1 || released[0].Project.Path != "legacy" {
		t.Fatalf("UnlockByPull should answer legacy's lock it freed, got %+v", released)
	}
	if !strings.Contains(err.Error(), "enhanced") {
		t.Fatalf("the error should name the store that did not answer: %v", err)
	}
}

// silentService is the URL of a service that takes connections and never answers (hung, or a
// proxy in front of a dead one); it and its connections are closed when the test ends.
func silentService(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", servicetest.Loopback+":0")
	must(t, err)
	var held []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, conn)
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
	return "http://" + l.Addr().String()
}

func TestWithTimeoutIsTheBoundOfEachCallOverTheClientsOwn(t *testing.T) {
	// The client's own call bound, lowered here to 300ms so as not to wait out its 30s
	// default, must not cut WithTimeout short: WithTimeout(45s) gave up after the default's
	// 30s. A proxy in front of the service holds each call's answer until a call bound by
	// the client's 300ms alone, sent after the database's, has given up on it: the
	// database's call, still waiting then, gets the service's answer.
	svc := servicetest.Serve(t)
	arrived := make(chan struct{}, 1)
	released := make(chan struct{})
	through := servicetest.Proxy(t, svc.URL, 0, func(http.ResponseWriter, *http.Request) bool {
		select {
		case arrived <- struct{}{}:
		default:
		}
		<-released
		return false // on to the service
	})
	clientsOwn := []client.Option{client.WithCallTimeout(300 * time.Millisecond), client.WithRetries(1, 0)}
	database := openAt(t, through, lockdb.WithTimeout(30*time.Second), lockdb.WithClientOptions(clientsOwn...))
	project := models.NewProject("acme/infra", ".", "")
	answered := make(chan error, 1)
	go func() {
		_, err := database.GetLock(project, "default")
		answered <- err
	}()
	<-arrived
	alone, err := client.New(through, clientsOwn...)
	must(t, err)
	_, err = alone.Get(context.Background(), models.GenerateLockKey(project, "default"))
	if !client.IsUnavailable(err) || !errors.Is(err, context.DeadlineExceeded) {
		close(released)
		t.Fatalf("a call bound by the client's 300ms alone should run out held, got %v", err)
	}
	close(released)
	if err := <-answered; err != nil {
		t.Fatalf("the database's call, bound by WithTimeout, should outlive the client's own "+
			"bound and get the service's answer, got %v", err)
	}

	// A service that takes calls and never answers: the call runs out its context, whose
	// deadline is WithTimeout's. What Atlantis puts in the pull request's comment says what
	// happened, and the time the call had (that deadline's), not only Go's "context deadline
	// exceeded".
	database = openAt(t, silentService(t), lockdb.WithTimeout(2*time.Second),
		lockdb.WithClientOptions(clientsOwn...))
	_, err = database.GetLock(project, "default")
	if !client.IsUnavailable(err) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a service that never answers should run out the call's time, got %v", err)
	}
	if said := err.Error(); !strings.Contains(said, "did not answer within 2s") ||
		!strings.Contains(said, "took the call and sent nothing back") {
		t.Fatalf("the error should say the service did not answer within the call's 2s, got %q", said)
	}
}

// heldByPull1 is acme/infra's envs/prod, whose lock in workspace default pull 1 of acme/infra
// holds now, with the lock a pull of acme/infra asks for on it, and its key.
func heldByPull1(t *testing.T, database *lockdb.Database) (models.Project, func(num int) models.ProjectLock, string) {
	t.Helper()
	project := models.NewProject("acme/infra", "envs/prod", "")
	lockFor := func(num int) models.ProjectLock {
		return models.ProjectLock{Project: project, Workspace: "default", Pull: pullOf("acme/infra", num), User: alice, Time: time.Now()}
	}
	ok, _, err := database.TryLock(lockFor(1))
	must(t, err)
	if !ok {
		t.Fatal("pull 1 should get the free lock at once")
	}
	return project, lockFor, models.GenerateLockKey(project, "default")
}

func TestTryLockWaitsInTheQueueAndApplyGoesBeforePlan(t *testing.T) {
	forEachStore(t, func(t *testing.T, s store) {
		svc := s.serve(t, "--enhanced-locking-enabled", "--enhanced-locking-priority-queue")
		// Each release frees the key at once (no hold-over, holdover_test.go): the queue's
		// order is what is tested.
		database := open(t, svc, lockdb.WithWait(20*time.Second), lockdb.WithHoldOver(0))
		project, lockFor, key := heldByPull1(t, database)
		order := make(chan int, 2)
		var wg sync.WaitGroup
		wait := func(view *lockdb.Database, num int) {
			defer wg.Done()
			ok, holder, err := view.TryLock(lockFor(num))
			if err != nil || !ok {
				t.Errorf("pull %d should be granted from the queue, got %v %+v %v", num, ok, holder, err)
				return
			}
			order <- num
			_, err = view.UnlockIfOwnedByPull(project, "default", num)
			if err != nil {
				t.Errorf("pull %d unlock: %v", num, err)
			}
		}
		wg.Add(1)
		go wait(database.ForCommand(command.Plan), 2)
		waitForWaiters(t, database.Client(), key, 1)
		wg.Add(1)
		go wait(database.ForCommand(command.Apply), 3)
		waitForWaiters(t, database.Client(), key, 2)
		_, err := database.UnlockIfOwnedByPull(project, "default", 1)
		must(t, err)
		wg.Wait()
		close(order)
		var got []int
		for n := range order {
			got = append(got, n)
		}
		if fmt.Sprint(got) != "[3 2]" {
			t.Fatalf("apply (pull 3, queued second) should be served before plan (pull 2): got %v", got)
		}
	})
}

func TestAWaitAboveTheServicesMaxTimeoutIsAnErrorNamingTheSetting(t *testing.T) {
	// The service refuses a wait above its enhanced-locking-max-timeout rather than shorten
	// it: an adapter given a longer WithWait fails every TryLock, and the error Atlantis puts
	// in the pull request's comment names the setting to raise (docs/07-atlantis-go.md).
	svc := servicetest.Serve(t, "--enhanced-locking-enabled", "--enhanced-locking-max-timeout", "1m")
	database := open(t, svc, lockdb.WithWait(2*time.Minute))
	lock := models.ProjectLock{Project: models.NewProject("acme/infra", "envs/prod", "prod"),
		Workspace: "default", Pull: pullOf("acme/infra", 1), User: alice, Time: time.Now()}
	ok, _, err := database.TryLock(lock)
	var invalid *client.InvalidError
	if ok || !errors.As(err, &invalid) || invalid.Field != "wait" ||
		!strings.Contains(err.Error(), "enhanced-locking-max-timeout") {
		t.Fatalf("want an *InvalidError of field wait naming enhanced-locking-max-timeout, got %v %v", ok, err)
	}
	if held, err := database.GetLock(lock.Project, "default"); err != nil || held != nil {
		t.Fatalf("nothing should be held, got %+v %v", held, err)
	}
}

func TestImportAndStateAskWithApplysPriority(t *testing.T) {
	// `atlantis import` and `atlantis state rm` write the state as apply does, and take the
	// project lock as apply does: their views ask with apply's priority, not plan's.
	svc := servicetest.Serve(t, "--enhanced-locking-enabled", "--enhanced-locking-priority-queue")
	database := open(t, svc, lockdb.WithWait(20*time.Second))
	_, lockFor, key := heldByPull1(t, database)
	for i, name := range []command.Name{command.Import, command.State} {
		num := 2 + i
		answered := make(chan error, 1)
		go func() {
			_, _, err := database.ForCommand(name).TryLock(lockFor(num))
			answered <- err
		}()
		q := waitForWaiters(t, database.Client(), key, 1)
		if got := q.Waiters[0].Priority; got != client.PriorityHigh {
			t.Errorf("%s's view should ask with apply's priority (high), asked with %q", name, got)
		}
		cancelled, err := database.Client().Cancel(context.Background(), key, q.Waiters[0].ID)
		must(t, err)
		if !cancelled || <-answered == nil {
			t.Fatalf("%s's queued request should be cancelled", name)
		}
	}
}

func TestUnlockByPullDropsThePullsWaitingTryLock(t *testing.T) {
	forEachStore(t, func(t *testing.T, s store) {
		svc := s.serve(t, "--enhanced-locking-enabled")
		// Pull 1's release below frees the key at once (no hold-over, holdover_test.go): the
		// key is then seen free, not handed to the released pull 2.
		database := open(t, svc, lockdb.WithWait(20*time.Second), lockdb.WithHoldOver(0))
		project := models.NewProject("acme/infra", "envs/prod", "")
		other := models.NewProject("acme/infra", "envs/dev", "")
		lockFor := func(p models.Project, num int) models.ProjectLock {
			return models.ProjectLock{Project: p, Workspace: "default", Pull: pullOf("acme/infra", num), User: alice, Time: time.Now()}
		}
		for _, l := range []models.ProjectLock{lockFor(project, 1), lockFor(other, 2)} {
			ok, _, err := database.TryLock(l)
			must(t, err)
			if !ok {
				t.Fatalf("pull %d should get the free lock at once", l.Pull.Num)
			}
		}
		key := models.GenerateLockKey(project, "default")
		type answer struct {
			ok     bool
			holder models.ProjectLock
			err    error
		}
		waiting := make(chan answer, 1)
		go func() { // pull 2's plan of envs/prod, waiting for pull 1
			ok, holder, err := database.TryLock(lockFor(project, 2))
			waiting <- answer{ok, holder, err}
		}()
		waitForWaiters(t, database.Client(), key, 1)

		// Pull 2 closes (or is unlocked with `atlantis unlock`): Atlantis calls UnlockByPull.
		freed, err := database.UnlockByPull("acme/infra", 2)
		must(t, err)
		if len(freed) != 1 || freed[0].Project.Path != "envs/dev" {
			t.Fatalf("UnlockByPull(acme/infra, 2) should free envs/dev, freed %+v", freed)
		}
		var got answer
		select {
		case got = <-waiting:
		case <-time.After(15 * time.Second):
			t.Fatal("the waiting TryLock of pull 2 should return once its pull's locks are released")
		}
		var held *client.HeldError
		if got.ok || got.err == nil || !errors.As(got.err, &held) || held.Reason != client.ReasonCancelled ||
			!strings.Contains(got.err.Error(), "its pull's locks were released") {
			t.Fatalf("the waiting TryLock should fail saying its request was dropped, got %v %+v %v", got.ok, got.holder, got.err)
		}
		// Pull 1 lets go: the key is free, not handed to the released pull 2.
		_, err = database.UnlockIfOwnedByPull(project, "default", 1)
		must(t, err)
		lock, err := database.GetLock(project, "default")
		must(t, err)
		if lock != nil {
			t.Fatalf("envs/prod should be free after pull 1 let go, it is held by pull #%d", lock.Pull.Num)
		}
		// Released again: nothing held, nothing queued.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		again, err := database.Client().ReleasePullQueued(ctx, "acme/infra", 2)
		must(t, err)
		if len(again.Released) != 0 || len(again.Cancelled) != 0 {
			t.Fatalf("pull 2 holds and waits for nothing any more, its release did %+v", again)
		}
	})
}

func TestPingAnswersWithinItsWindowWhenTheServiceDoesNot(t *testing.T) {
	// Atlantis serves Ping as its /readyz. A service that takes the connection and sends
	// nothing back (hung, or a proxy in front of a dead one) makes Ping fail once its window
	// ran out, not after the 30s a lock call gives a restarting service: the error names the
	// window.
	database := openAt(t, silentService(t)) // the default 30s
	err := database.Ping()
	if !client.IsUnavailable(err) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Ping of a service that sends nothing back must fail unavailable, got %v", err)
	}
	if want := fmt.Sprintf("did not answer within %s", lockdb.PingWindow); !strings.Contains(err.Error(), want) {
		t.Fatalf("the error should say %q, got %q", want, err)
	}
}

func TestPingChecksTheWrappedDatabaseToo(t *testing.T) {
	database := open(t, servicetest.Serve(t))
	must(t, database.Ping())
	must(t, database.Wrapped().Close())
	if err := database.Ping(); err == nil {
		t.Fatal("Ping must fail when the wrapped database is closed")
	}
}

func TestPingFailsWhenTheServiceDoesNotKnowTheToken(t *testing.T) {
	// Atlantis's /readyz is Ping: a replica whose token is missing or wrong would fail every
	// lock call with a 401, so it is not ready (a rollout carrying the wrong token stops at
	// its first replica). A known token is ready also when its role may not read the
	// service's configuration (the call Ping asks with answers 403).
	svc := servicetest.Serve(t, append(servicetest.StaticAccess([]string{"narrow-token,narrow,2"}),
		"--enhanced-locking-enabled")...)
	for _, token := range []string{"", "wrong-token"} {
		var opts []lockdb.Option
		if token != "" {
			opts = append(opts, lockdb.WithClientOptions(client.WithToken(token)))
		}
		err := open2(t, svc, opts...).Ping()
		var denied *client.DeniedError
		if !errors.As(err, &denied) || denied.Status != 401 {
			t.Fatalf("Ping with token %q should fail with the service's 401, got %v", token, err)
		}
		if token != "" && strings.Contains(err.Error(), token) {
			t.Fatalf("Ping's error must not show the token: %v", err)
		}
	}
	must(t, open2(t, svc, lockdb.WithClientOptions(client.WithToken(servicetest.AtlantisToken))).Ping())
	must(t, open2(t, svc, lockdb.WithClientOptions(client.WithToken("narrow-token"))).Ping())
}

func TestApplyOnTheLockerRoleAsksWithNormalPriority(t *testing.T) {
	// The locker role ("what Atlantis needs", the one the chart binds Atlantis to) may lock
	// but not ask above normal. Apply's default priority (high) must not make every apply
	// fail with a 403: the view asks again at normal. A priority the operator chose is
	// refused as it came.
	svc := servicetest.Serve(t, append(servicetest.StaticAccess(nil),
		"--enhanced-locking-enabled", "--enhanced-locking-priority-queue")...)
	token := lockdb.WithClientOptions(client.WithToken(servicetest.AtlantisToken))
	database := open(t, svc, token)
	lockFor := func(path string) models.ProjectLock {
		return models.ProjectLock{Project: models.NewProject("acme/infra", path, ""), Workspace: "default",
			Pull: pullOf("acme/infra", 1), User: alice, Time: time.Now()}
	}
	ok, _, err := database.ForCommand(command.Apply).TryLock(lockFor("envs/prod"))
	if err != nil || !ok {
		t.Fatalf("apply on the locker role should get the free lock, got %v %v", ok, err)
	}
	held, err := database.Client().Get(context.Background(), "acme/infra/envs/prod/default/")
	must(t, err)
	if held == nil || held.Priority != client.PriorityNormal {
		t.Fatalf("the lock should be held at normal priority, got %+v", held)
	}
	chosen := open(t, svc, token, lockdb.WithCommandPriorities(map[command.Name]client.Priority{
		command.Apply: client.PriorityHigh}))
	ok, _, err = chosen.ForCommand(command.Apply).TryLock(lockFor("envs/stage"))
	var denied *client.DeniedError
	if ok || !errors.As(err, &denied) || denied.Status != 403 || denied.Verb != "prioritize" {
		t.Fatalf("a priority the operator chose should be refused as it came, got %v %v", ok, err)
	}
	ok, _, err = open(t, svc, token, lockdb.WithPriority(client.PriorityHigh)).TryLock(lockFor("envs/stage"))
	if ok || !errors.As(err, &denied) || denied.Verb != "prioritize" {
		t.Fatalf("WithPriority(high) should be refused as it came, got %v %v", ok, err)
	}
	// Atlantis's lock page frees a key whoever holds it: release-any, which the locker role
	// has not (docs/07-atlantis-go.md says so). The lock stays; the pull's own release goes.
	prod := models.NewProject("acme/infra", "envs/prod", "")
	if _, err := database.Unlock(prod, "default"); !errors.As(err, &denied) || denied.Verb != "release-any" {
		t.Fatalf("Unlock on the locker role should be refused for release-any, got %v", err)
	}
	freed, err := database.UnlockByPull("acme/infra", 1)
	must(t, err)
	if len(freed) != 1 || freed[0].Project.Path != "envs/prod" {
		t.Fatalf("the pull's own release should free its lock, freed %+v", freed)
	}
}

func TestTheHoldersTryLockRenewsTheLeaseFromNow(t *testing.T) {
	// With lock-ttl set the service's locks expire, and the pull that holds a lock gets it
	// back as it was, lease and all: Atlantis's apply after its plan must not run on what is
	// left of the plan's lease, or the lock could expire under the apply and go to the next
	// waiter. The plan's lease here is one minute (what is left of it, as if an hour went
	// by); the apply's TryLock renews it to lock-ttl from now, on the same hold.
	forEachStore(t, func(t *testing.T, s store) {
		svc := s.serve(t, "--enhanced-locking-enabled", "--enhanced-locking-lock-ttl", "2h")
		database := open(t, svc)
		project := models.NewProject("acme/infra", "envs/prod", "prod")
		ctx := context.Background()
		planned, err := database.Client().Acquire(ctx, client.AcquireRequest{
			Project:   client.Project{RepoFullName: "acme/infra", Path: "envs/prod", ProjectName: "prod"},
			Workspace: "default", Pull: client.Pull{Num: 1}, User: client.User{Username: "alice"},
			TTL: time.Minute})
		must(t, err)
		if planned.ExpiresAt == nil {
			t.Fatalf("the plan's lock should have a lease, got %+v", planned)
		}
		ok, _, err := database.ForCommand(command.Apply).TryLock(models.ProjectLock{Project: project,
			Workspace: "default", Pull: pullOf("acme/infra", 1), User: alice, Time: time.Now()})
		if err != nil || !ok {
			t.Fatalf("the holder's apply should get its lock, got %v %v", ok, err)
		}
		applied, err := database.Client().Get(ctx, planned.Key)
		must(t, err)
		if applied == nil || applied.FencingToken != planned.FencingToken || applied.ExpiresAt == nil {
			t.Fatalf("the apply should hold the plan's lock (token %d) with a lease, got %+v",
				planned.FencingToken, applied)
		}
		if renewed := applied.ExpiresAt.Sub(*planned.ExpiresAt); renewed < 118*time.Minute {
			t.Fatalf("the apply's lease should be lock-ttl (2h) from the apply on, it moved by %v "+
				"(plan's ended %v, apply's ends %v)", renewed, planned.ExpiresAt, applied.ExpiresAt)
		}
	})
}

func TestAtlantisTakesTheProjectLockForPlanOrForApplyNeverBoth(t *testing.T) {
	// Atlantis v0.47.1 gives its project locker repoLocking = (mode == on_plan) for a plan
	// and (mode == on_apply) for an apply (project_command_runner.go, doPlan and doApply): in
	// its default mode, on_plan, an apply asks the no-op locker and the lock database is not
	// called, so nothing renews the plan's lease (lock-ttl) for the apply; in mode on_apply a
	// plan takes no lock. A plan and an apply never meet in the queue, and the lease the
	// apply runs on is the plan's: what docs/07-atlantis-go.md says of lock-ttl and priorities.
	database := open(t, servicetest.Serve(t, "--enhanced-locking-enabled",
		"--enhanced-locking-lock-ttl", "2h"))
	log := logging.NewNoopLogger(t)
	project := models.NewProject("acme/infra", "envs/prod", "prod")
	key := models.GenerateLockKey(project, "default")
	atlantisTakes := func(mode valid.RepoLocksMode, cmd command.Name, num int) bool {
		t.Helper()
		view := database.ForCommand(cmd)
		locking := map[command.Name]bool{command.Plan: mode == valid.RepoLocksOnPlanMode,
			command.Apply: mode == valid.RepoLocksOnApplyMode}[cmd]
		got, err := projectLocker(view, &github.Client{}).TryLock(log, pullOf("acme/infra", num),
			alice, "default", project, locking)
		must(t, err)
		return got.LockAcquired
	}
	lease := func() *client.Lock {
		t.Helper()
		lock, err := database.Client().Get(context.Background(), key)
		must(t, err)
		return lock
	}

	if !atlantisTakes(valid.DefaultRepoLocksMode, command.Plan, 1) {
		t.Fatal("pull 1's plan should get the free lock")
	}
	planned := lease()
	if valid.DefaultRepoLocksMode != valid.RepoLocksOnPlanMode || planned == nil || planned.ExpiresAt == nil {
		t.Fatalf("the default mode's plan should hold the lock with a lease, got %v %+v",
			valid.DefaultRepoLocksMode, planned)
	}
	time.Sleep(10 * time.Millisecond) // a renewal would move the lease's end past the plan's
	if !atlantisTakes(valid.DefaultRepoLocksMode, command.Apply, 1) {
		t.Fatal("pull 1's apply should go on")
	}
	if applied := lease(); applied == nil || applied.FencingToken != planned.FencingToken ||
		!applied.ExpiresAt.Equal(*planned.ExpiresAt) {
		t.Fatalf("the apply should leave the plan's lock and lease as they were (ends %v), got %+v",
			planned.ExpiresAt, applied)
	}
	if !atlantisTakes(valid.DefaultRepoLocksMode, command.Apply, 2) {
		t.Fatal("in the default mode an apply takes no lock, so another pull's apply is not refused")
	}
	_, err := database.UnlockByPull("acme/infra", 1)
	must(t, err)
	if !atlantisTakes(valid.RepoLocksOnApplyMode, command.Plan, 3) || lease() != nil {
		t.Fatalf("in mode on_apply a plan takes no lock, got %+v", lease())
	}
}

func TestPingIsReadyWhileTheServiceAnswersWithoutAStore(t *testing.T) {
	// Atlantis's /readyz is its database's Ping (server.go, Readyz). Every Atlantis replica
	// shares the service: a store of the service that does not answer would mark them all
	// not ready at once, and Atlantis would take no webhook and show no page, while the
	// fall-back serves the locks (and each lock call fails closed on its own where it
	// cannot). Ping says whether this Atlantis reaches the service and its own database;
	// the stores are the service's own readiness (client.Ready names the missing one).
	redis := servicetest.RedisServer(t)
	svc := servicetest.Serve(t, "--enhanced-locking-enabled", "--enhanced-locking-backend=redis",
		"--enhanced-locking-redis-addr="+redis.Addr, "--enhanced-locking-fallback=legacy")
	database := open(t, svc, lockdb.WithClientOptions(client.WithRetries(1, 0)))
	redis.Stop()
	var unavailable *client.UnavailableError
	err := database.Client().Ready(context.Background())
	if !errors.As(err, &unavailable) || unavailable.Status != 503 ||
		!slices.Equal(unavailable.Sides, []string{"enhanced"}) {
		t.Fatalf("the service's readiness should name the enhanced store, got %v", err)
	}
	must(t, database.Ping())
	ok, _, err := database.TryLock(models.ProjectLock{Project: models.NewProject("acme/infra", ".", ""),
		Workspace: "default", Pull: pullOf("acme/infra", 1), User: alice, Time: time.Now()})
	if err != nil || !ok {
		t.Fatalf("the fall-back should serve the lock meanwhile, got %v %v", ok, err)
	}
	svc.Stop()
	if err := database.Ping(); !client.IsUnavailable(err) {
		t.Fatalf("Ping must fail once the service cannot be reached, got %v", err)
	}
}

func TestPingIsReadyWhileTheServiceWithholdsItsLocks(t *testing.T) {
	// A service that grants no lock for now says why in its /readyz (503, withheld): here
	// enhanced locking is off and the store its locks were kept in did not answer at the
	// start, so it may still hold some. As with a store that does not answer, following it
	// would mark every Atlantis replica not ready at once; each lock call fails closed on its
	// own instead, and the error Atlantis shows on the pull says why.
	redis := servicetest.RedisServer(t)
	addr := redis.Addr
	redis.Stop()
	svc := servicetest.ServeAnswering(t, "--enhanced-locking-backend=redis", "--enhanced-locking-redis-addr="+addr)
	database := open2(t, svc, lockdb.WithClientOptions(client.WithRetries(1, 0)))
	var unavailable *client.UnavailableError
	err := database.Client().Ready(context.Background())
	if !errors.As(err, &unavailable) || unavailable.Status != 503 || unavailable.Withheld == "" {
		t.Fatalf("the service's readiness should say why it withholds its locks, got %v", err)
	}
	must(t, database.Ping())
	ok, _, err := database.TryLock(models.ProjectLock{Project: models.NewProject("acme/infra", ".", ""),
		Workspace: "default", Pull: pullOf("acme/infra", 1), User: alice, Time: time.Now()})
	if ok || !client.IsUnavailable(err) || !strings.Contains(err.Error(), "no lock is granted until it is read") {
		t.Fatalf("TryLock should fail closed saying why, got %v %v", ok, err)
	}
}

// open2 is open without its Ping: the adapter on a service that may not be ready.
func open2(t *testing.T, svc *servicetest.Service, opts ...lockdb.Option) *lockdb.Database {
	t.Helper()
	return openAt(t, svc.URL, opts...)
}

func TestAServiceKilledWhileATryLockWaitsFailsItClosedAndGrantsItNothingLater(t *testing.T) {
	// The service is killed (a crash, an evicted pod) while pull 2's plan waits in the queue
	// behind pull 1, and started again on the same data dir and port. Atlantis's TryLock
	// answers an error saying the service is unavailable (its plan fails; running it again
	// asks afresh), not "locked by" and not a grant. Pull 1's lock survives the crash; when
	// pull 1 lets go, the key is not granted to the waiter that died with the process (nobody
	// would ever release it), and pull 2's plan, run again, gets it.
	forEachStore(t, func(t *testing.T, s store) {
		svc := s.serve(t, "--enhanced-locking-enabled")
		database := open(t, svc, lockdb.WithWait(20*time.Second), lockdb.WithHoldOver(0))
		project, lockFor, key := heldByPull1(t, database)
		atlantis := locking.NewClient(database)
		type answer struct {
			acquired bool
			err      error
		}
		waited := make(chan answer, 1)
		go func() {
			r, err := atlantis.TryLock(project, "default", lockFor(2).Pull, alice)
			waited <- answer{r.LockAcquired, err}
		}()
		waitForWaiters(t, database.Client(), key, 1)
		svc.Kill()
		select {
		case got := <-waited:
			if got.acquired || !client.IsUnavailable(got.err) {
				t.Fatalf("the waiting TryLock should fail as unavailable, got %v %v", got.acquired, got.err)
			}
		case <-time.After(15 * time.Second):
			t.Fatal("the waiting TryLock was not answered after the service died")
		}
		svc.Restart(t)
		stillHeldBy(t, database, project, "acme/infra", 1)
		_, err := database.UnlockIfOwnedByPull(project, "default", 1)
		must(t, err)
		// On Redis the dead waiter may be granted first, as a claim its replica never confirms:
		// the claim lapses within the claim window (5s) after the heartbeat's (5s), as for a
		// replica that died (docs/03-redis.md). The embedded store keeps no waiter over a crash.
		deadline := time.Now().Add(20 * time.Second)
		for {
			lock, err := database.GetLock(project, "default")
			must(t, err)
			if lock == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the key should be free after pull 1 let go, still held by %+v", lock)
			}
			time.Sleep(100 * time.Millisecond)
		}
		again, err := atlantis.TryLock(project, "default", lockFor(2).Pull, alice)
		if err != nil || !again.LockAcquired {
			t.Fatalf("pull 2's plan run again should get the key, got %+v %v", again, err)
		}
	})
}

func TestPingOfAClosedPortAnswersTheRefusalWithinItsWindow(t *testing.T) {
	// A service gone (its port closed): Ping tries the connection again within PingWindow, not
	// within the lock calls' time (here an hour, which a probe would never outlast), and then
	// answers the refusal, not a context error.
	gone := "http://" + servicetest.Loopback + ":" + fmt.Sprint(servicetest.FreePort(t))
	err := openAt(t, gone, lockdb.WithTimeout(time.Hour)).Ping()
	if !client.IsUnavailable(err) || !errors.Is(err, syscall.ECONNREFUSED) ||
		errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Ping of a closed port must fail unavailable with the refusal, got %v", err)
	}
}

func TestPingReachesTheServiceThroughAnEndpointThatIsGone(t *testing.T) {
	// A restart or a rollout of the service: the first connection goes to an endpoint whose
	// pod is gone (its port refuses it), the next to the service. Tried again within
	// PingWindow, as a lock call is within its time, Ping answers ready: a restart shorter
	// than the window leaves Atlantis ready. Before, Ready sent once and Ping failed.
	svc := servicetest.Serve(t)
	gone := servicetest.Loopback + ":" + fmt.Sprint(servicetest.FreePort(t))
	var dials atomic.Int32
	var dialer net.Dialer
	transport := &http.Transport{DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if dials.Add(1) == 1 {
				return dialer.DialContext(ctx, network, gone)
			}
			return dialer.DialContext(ctx, network, addr)
		}}
	t.Cleanup(transport.CloseIdleConnections)
	database := open2(t, svc, lockdb.WithClientOptions(
		client.WithHTTPClient(&http.Client{Transport: transport})))
	if err := database.Ping(); err != nil {
		t.Fatalf("Ping should reach the service on its next connection, got %v", err)
	}
	if n := dials.Load(); n < 2 {
		t.Fatalf("the gone endpoint's refusal should have been tried again, %d dials", n)
	}
}
