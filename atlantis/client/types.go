package client

import (
	"path"
	"strings"
	"time"
)

// Priority is a waiter's place in the service order: waiters are served by priority, first
// come first served within one.
type Priority string

const (
	PriorityLow      Priority = "low"
	PriorityNormal   Priority = "normal"
	PriorityHigh     Priority = "high"
	PriorityCritical Priority = "critical"
)

// Reason says why an acquire was not granted.
type Reason string

const (
	ReasonHeld        Reason = "held"
	ReasonTimeout     Reason = "timeout"
	ReasonQueueFull   Reason = "queue_full"
	ReasonDeadlock    Reason = "deadlock"
	ReasonUnavailable Reason = "unavailable"
	ReasonCancelled   Reason = "cancelled"
	// ReasonCollision: another project's parts join to the same key.
	ReasonCollision Reason = "collision"
)

// Project is an Atlantis project: a directory of a repository, optionally named.
type Project struct {
	RepoFullName string `json:"repoFullName"`
	Path         string `json:"path,omitempty"`
	ProjectName  string `json:"projectName"`
}

// Pull is the pull request that holds or asks for a lock.
type Pull struct {
	Num        int    `json:"num"`
	URL        string `json:"url,omitempty"`
	Author     string `json:"author,omitempty"`
	HeadBranch string `json:"headBranch,omitempty"`
	BaseBranch string `json:"baseBranch,omitempty"`
	HeadCommit string `json:"headCommit,omitempty"`
	// State is "open" or "closed".
	State string `json:"state,omitempty"`
	// VCSHost is where the pull's repository lives (Atlantis's BaseRepo.VCSHost); left
	// out, the service derives it from URL.
	VCSHost *VCSHost `json:"vcsHost,omitempty"`
	// SanitizedCloneURL is the pull's repository's clone URL (Atlantis's
	// BaseRepo.SanitizedCloneURL), without credentials: the service strips any
	// user:password@ from it.
	SanitizedCloneURL string `json:"sanitizedCloneUrl,omitempty"`
}

// VCSHost is a VCS host: its hostname and its type by Atlantis's name for it ("Github",
// "Gitlab", "BitbucketCloud", "BitbucketServer", "AzureDevops", "Gitea").
type VCSHost struct {
	Hostname string `json:"hostname"`
	Type     string `json:"type"`
}

// User ran the command that asks for the lock.
type User struct {
	Username string   `json:"username"`
	Teams    []string `json:"teams"`
}

// CycleOwner is one owner (a pull request of a repository) of a deadlock's cycle, as the
// service shows it to the caller. An owner in a repository the caller may not read is named
// "(other repository)" (OtherRepository), with an empty Repo and a zero Pull.
type CycleOwner struct {
	Name string `json:"name"`
	Repo string `json:"repo"`
	Pull int    `json:"pull"`
}

// OtherRepository is the Name of a CycleOwner in a repository the caller may not read.
const OtherRepository = "(other repository)"

// Lock is a held lock, as the service reports it.
type Lock struct {
	Key        string    `json:"key"`
	Project    Project   `json:"project"`
	Workspace  string    `json:"workspace"`
	Pull       Pull      `json:"pull"`
	User       User      `json:"user"`
	Priority   Priority  `json:"priority"`
	AcquiredAt time.Time `json:"acquiredAt"`
	// ExpiresAt is the end of the lease; nil for a lock without one.
	ExpiresAt *time.Time `json:"expiresAt"`
	// FencingToken strictly increases per key across releases, restarts and replicas
	// (0 for locks in Atlantis's own layout, which has none).
	FencingToken int64 `json:"fencingToken"`
	// Backend is the side that granted it: "legacy" or "enhanced".
	Backend string `json:"backend"`
	// Grant says, of a lock Acquire or AcquireBatch answered, whether that call granted it
	// (GrantNew: its lease, if it has one, starts now), answered the lock its pull held
	// already (GrantAgain: unchanged, lease and all), or upgraded its pull's shared hold to
	// exclusive in place (GrantUpgraded: a new fencing token, its lease starting now). "" for
	// locks other calls answer, and
	// where the service did not say (a release before it said so, or a proxy that drops the
	// header).
	Grant Grant `json:"-"`
}

// Grant is how an acquire's lock came to its pull (the answer's Lock-Grant header).
type Grant string

const (
	// GrantNew: the call granted the lock.
	GrantNew Grant = "new"
	// GrantAgain: the call's pull held the lock already; it is answered unchanged.
	GrantAgain Grant = "again"
	// GrantUpgraded: the call's pull held the lock shared and the call made it exclusive in
	// place (a new fencing token, its lease starting now). The service never gives it back
	// as a grant (that would free the pull's shared hold with it).
	GrantUpgraded Grant = "upgraded"
)

// LeaseStartsNow says the call's answer started the lock's lease (GrantNew, GrantUpgraded):
// a lock its pull held already (GrantAgain, or not said) has what is left of its lease.
func (g Grant) LeaseStartsNow() bool { return g == GrantNew || g == GrantUpgraded }

// grantHeader is the header of an acquire's 200 that says which Grant it is.
const grantHeader = "Lock-Grant"

// AcquireRequest asks for one lock. Without Wait it fails fast, as Atlantis does.
type AcquireRequest struct {
	Project   Project
	Workspace string
	Pull      Pull
	User      User
	// Priority in the key's queue (default normal).
	Priority Priority
	// Wait is how long the request may wait in the key's queue (0: fail fast).
	Wait time.Duration
	// TTL is a lease: the lock expires unless refreshed (0: no lease).
	TTL time.Duration
	// RequestID names the request, so that it can be cancelled while it waits.
	RequestID string
}

// BatchItem is one lock of a batch.
type BatchItem struct {
	Project   Project `json:"project"`
	Workspace string  `json:"workspace"`
}

// BatchRequest asks for several locks of one pull, all or nothing.
type BatchRequest struct {
	Locks     []BatchItem
	Pull      Pull
	User      User
	Priority  Priority
	Wait      time.Duration
	TTL       time.Duration
	RequestID string
}

// BatchRelease is the answer to a batch release.
type BatchRelease struct {
	Released []Lock   `json:"released"`
	NotHeld  []string `json:"notHeld"`
}

// ListFilter narrows List: a repository (exact), a pull number, or both.
type ListFilter struct {
	Repo string
	Pull *int
}

// Waiter is one queued request, as GET /v1/queue reports it.
type Waiter struct {
	Position          int       `json:"position"`
	ID                string    `json:"id"`
	RequestID         string    `json:"requestId"`
	Repo              string    `json:"repo"`
	Pull              int       `json:"pull"`
	User              string    `json:"user"`
	Priority          Priority  `json:"priority"`
	EffectivePriority Priority  `json:"effectivePriority"`
	EnqueuedAt        time.Time `json:"enqueuedAt"`
	Deadline          time.Time `json:"deadline"`
	WaitedMs          int64     `json:"waitedMs"`
	Keys              []string  `json:"keys"`
}

// Queue is a key's holder and its waiters in service order (the first is served next).
type Queue struct {
	Key     string   `json:"key"`
	Holder  *Lock    `json:"holder"`
	Waiters []Waiter `json:"waiters"`
}

// CleanPath is a project path as Atlantis writes it (models.NewProject): cleaned like Go's
// path.Clean, with the repository root as ".".
func CleanPath(p string) string {
	if p == "" {
		return "."
	}
	cleaned := path.Clean(p)
	if cleaned == "/" {
		return "."
	}
	return cleaned
}

// LockKey is Atlantis's lock key, {repoFullName}/{path}/{workspace}/{projectName}, from the
// cleaned path (so "envs/net/", "./envs/net" and "envs/net" are one lock).
func LockKey(project Project, workspace string) string {
	if workspace == "" {
		workspace = "default"
	}
	return strings.Join([]string{project.RepoFullName, CleanPath(project.Path), workspace,
		project.ProjectName}, "/")
}
