package lockdb

import (
	"strings"

	"github.com/runatlantis/atlantis/server/events/models"

	"github.com/runatlantis/enhanced-locking/atlantis/client"
)

// What crosses to the service and back. Every field Atlantis reads from a lock survives:
// Project, Workspace, User (name and teams), Time (the service's grant time), and of the
// pull its number, URL, author, branches, head commit, state and base repository (full
// name, owner, name, sanitized clone URL, VCS host and type). The sanitized clone URL goes
// without its user:<redacted>@: Atlantis's Bitbucket Server client reads the project key
// from its path when it comments on a pull whose lock was deleted from its UI. Not carried,
// on purpose: BaseRepo.CloneURL (it holds Atlantis's VCS token; locks never store
// credentials), the pull's Body and HardenedNonPRRefCheckout — Atlantis reads neither from a
// lock.

func project(p models.Project) client.Project {
	return client.Project{RepoFullName: p.RepoFullName, Path: client.CleanPath(p.Path), ProjectName: p.ProjectName}
}

var pullStates = map[models.PullRequestState]string{models.OpenPullState: "open", models.ClosedPullState: "closed"}

func pull(p models.PullRequest) client.Pull {
	out := client.Pull{
		Num: p.Num, URL: p.URL, Author: p.Author, HeadBranch: p.HeadBranch,
		BaseBranch: p.BaseBranch, HeadCommit: p.HeadCommit, State: pullStates[p.State],
	}
	if host := p.BaseRepo.VCSHost; host.Hostname != "" {
		out.VCSHost = &client.VCSHost{Hostname: host.Hostname, Type: host.Type.String()}
	}
	out.SanitizedCloneURL = withoutUserinfo(p.BaseRepo.SanitizedCloneURL)
	return out
}

// withoutUserinfo is u without the user:password@ of its authority (Atlantis's sanitized
// clone URL has the VCS user and "<redacted>", which net/url refuses to parse).
func withoutUserinfo(u string) string {
	scheme, rest, ok := strings.Cut(u, "://")
	if !ok {
		return u
	}
	authority, path := rest, ""
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		authority, path = rest[:i], rest[i:]
	}
	at := strings.LastIndex(authority, "@")
	if at < 0 {
		return u
	}
	return scheme + "://" + authority[at+1:] + path
}

func user(u models.User) client.User {
	return client.User{Username: u.Username, Teams: u.Teams}
}

var vcsTypes = map[string]models.VCSHostType{
	"Github": models.Github, "Gitlab": models.Gitlab, "BitbucketCloud": models.BitbucketCloud,
	"BitbucketServer": models.BitbucketServer, "AzureDevops": models.AzureDevops, "Gitea": models.Gitea,
}

func projectLock(l client.Lock) models.ProjectLock {
	state := models.OpenPullState
	if l.Pull.State == "closed" {
		state = models.ClosedPullState
	}
	var teams []string
	if len(l.User.Teams) > 0 {
		teams = l.User.Teams
	}
	out := models.ProjectLock{
		Project: models.Project{
			ProjectName: l.Project.ProjectName, RepoFullName: l.Project.RepoFullName, Path: l.Project.Path,
		},
		Workspace: l.Workspace,
		Pull: models.PullRequest{
			Num: l.Pull.Num, HeadCommit: l.Pull.HeadCommit, URL: l.Pull.URL,
			HeadBranch: l.Pull.HeadBranch, BaseBranch: l.Pull.BaseBranch, Author: l.Pull.Author,
			State: state,
		},
		User: models.User{Username: l.User.Username, Teams: teams},
		Time: l.AcquiredAt.Local(),
	}
	// A pull that came with its host gets its base repository back as Atlantis built it;
	// one that came without (a bare PullRequest) gets the empty one it had.
	if host := l.Pull.VCSHost; host != nil && host.Hostname != "" {
		owner, name := models.SplitRepoFullName(l.Project.RepoFullName)
		out.Pull.BaseRepo = models.Repo{
			FullName: l.Project.RepoFullName, Owner: owner, Name: name,
			SanitizedCloneURL: l.Pull.SanitizedCloneURL,
			VCSHost:           models.VCSHost{Hostname: host.Hostname, Type: vcsTypes[host.Type]},
		}
	}
	return out
}

func projectLocks(locks []client.Lock) []models.ProjectLock {
	out := make([]models.ProjectLock, 0, len(locks))
	for _, l := range locks {
		out = append(out, projectLock(l))
	}
	return out
}
