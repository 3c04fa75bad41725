package client

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
)

// The errors a call can return, as a tree:
//
//	error
//	├── *HeldError         an acquire was not granted: the holder, the reason (held, timeout,
//	│                      queue_full, deadlock, cancelled, collision) and the queue position
//	├── *NotOwnerError     a release or refresh named a pull that does not hold the lock
//	├── *InvalidError      the service refused the request as written (4xx: which field, why)
//	├── *DeniedError       the service does not know or allow the caller (401, 403)
//	├── *UnavailableError  the service, or the store behind it, did not answer (or is at its
//	│                      limit of event streams: 429); the only error a retry can cure.
//	│                      A list or a pull's release that one store did not answer returns
//	│                      what the others answered along with it (Sides names the missing)
//	└── *UnreadableError   a list found stored locks that cannot be read (they still hold
//	                       their keys until a force-unlock clears them); the readable locks
//	                       come along with it
//
// Every error that is about one lock carries its key. Match them with errors.As; a call
// that was cancelled or ran out of time through its context answers with an
// *UnavailableError wrapping the context's error, so errors.Is(err, context.Canceled) holds.

// HeldError says an acquire was not granted.
type HeldError struct {
	Key string
	// Reason is why: ReasonHeld, ReasonTimeout, ReasonQueueFull, ReasonDeadlock or
	// ReasonCancelled.
	Reason Reason
	// Holder is the lock that stood in the way, when the service named one.
	Holder *Lock
	// QueuePosition is the request's place in the key's queue when it gave up (0: none).
	QueuePosition int
	// Cycle names the owners ("repo#pull") of a deadlock's cycle, from the caller's pull back
	// to it, when Reason is ReasonDeadlock; CycleOwners gives the same owners with their
	// repository and pull as fields of their own. An owner in a repository the caller may not
	// read is OtherRepository in both (no repository, no pull), and HiddenOwners counts them.
	Cycle        []string
	CycleOwners  []CycleOwner
	HiddenOwners int
	// Message is the service's own word on it, when it said one (a cancelled request: by
	// what it was taken out of the queue).
	Message string
}

func (e *HeldError) Error() string {
	said := ""
	if e.Message != "" {
		said = ": " + e.Message
	}
	if e.Holder != nil {
		return fmt.Sprintf("lock %s not acquired (%s): held by pull #%d of %s%s",
			e.Key, e.Reason, e.Holder.Pull.Num, e.Holder.Project.RepoFullName, said)
	}
	return fmt.Sprintf("lock %s not acquired (%s)%s", e.Key, e.Reason, said)
}

// NotOwnerError says a release or refresh named a pull that does not hold the lock, or that a
// force-unlock found the key held by another hold than the one it read and checked (nothing
// was freed: read the key again).
type NotOwnerError struct {
	Key string
	// Holder is the lock's holder; nil when it is a project of a repository the caller may
	// not read, and for a force-unlock's.
	Holder  *Lock
	Message string
}

func (e *NotOwnerError) Error() string { return e.Message }

// InvalidError says the service refused the request as written.
type InvalidError struct {
	Status int
	// Field names what was wrong (e.g. "wait", "pull.num"), when the service said.
	Field   string
	Message string
	Key     string
}

func (e *InvalidError) Error() string { return fmt.Sprintf("invalid request: %s", e.Message) }

// DeniedError says the service refused the caller: 401 (who) or 403 (not allowed).
type DeniedError struct {
	Status  int
	Message string
	// Verb is the right the caller lacks ("lock", "prioritize", ...), when the service named
	// it (its 403 does).
	Verb string
}

func (e *DeniedError) Error() string {
	if e.Status == http.StatusUnauthorized {
		// Whoever reads it (Atlantis puts it in the pull request's comment) is told where the
		// client's token comes from, never the token.
		return fmt.Sprintf("refused by the lock service (%d): %s (the client sends the token of "+
			"client.WithToken, or of client.WithTokenFile for a mounted ServiceAccount token: "+
			"docs/08-access.md)", e.Status, e.Message)
	}
	return fmt.Sprintf("refused by the lock service (%d): %s", e.Status, e.Message)
}

// UnavailableError says the service, or the store behind it, did not answer.
type UnavailableError struct {
	// Op is the call ("acquire", "list", ...).
	Op  string
	Key string
	// Status is the HTTP status when the service answered (502, 503, 504, 409 with reason
	// "unavailable", or 200 for a partial answer: see Sides); 0 when it could not be reached.
	Status int
	// Sides names the lock stores ("legacy", "enhanced") that did not answer when the
	// service answered without them (a list or a pull's release, status 200): what the call
	// returned along with this error is what the other sides hold or freed. From Ready: the
	// stores its 503 names (the service answered; they did not).
	Sides []string
	// Withheld, from Ready: why the service grants no lock for now, as its own 503 says (its
	// operator's LockPolicy not applied yet, a switched-off store not read); the service
	// answered, and each lock call is refused with the same words.
	Withheld string
	Message  string
	Err      error
}

func (e *UnavailableError) Error() string {
	where := ""
	if e.Key != "" {
		where = " of " + e.Key
	}
	switch {
	case e.Err != nil && e.Message != "":
		return fmt.Sprintf("lock service unavailable (%s%s): %s (%v)", e.Op, where, e.Message, e.Err)
	case e.Err != nil:
		return fmt.Sprintf("lock service unavailable (%s%s): %v", e.Op, where, e.Err)
	case e.Status != 0:
		return fmt.Sprintf("lock service unavailable (%s%s, %d): %s", e.Op, where, e.Status, e.Message)
	default:
		return fmt.Sprintf("lock service unavailable (%s%s): %s", e.Op, where, e.Message)
	}
}

func (e *UnavailableError) Unwrap() error { return e.Err }

// UnreadableError says a list found stored locks that cannot be read: their keys are held
// (nothing is granted on them) until a force-unlock clears them, but whose they are is not
// known. The call returns the readable locks along with it.
type UnreadableError struct {
	Keys []string
}

func (e *UnreadableError) Error() string {
	return fmt.Sprintf("stored locks that cannot be read hold %s (a force-unlock of each clears it): "+
		"the list is not whole", strings.Join(e.Keys, ", "))
}

// IsHeld reports whether err says an acquire was not granted, whatever the reason.
func IsHeld(err error) bool {
	var held *HeldError
	return errors.As(err, &held)
}

// IsUnavailable reports whether err says the service or its store did not answer.
func IsUnavailable(err error) bool {
	var unavailable *UnavailableError
	return errors.As(err, &unavailable)
}
