// Command bboltwriter writes a bbolt file the way Atlantis does, for the importer's tests.
//
// It reads a JSON spec on standard input: the file to write, an optional page size, and a list
// of transactions, each a list of operations (create a bucket, put a raw value, put an Atlantis
// ProjectLock or PullStatus marshalled from Atlantis's own Go structs, delete a key or a
// bucket). After writing it reopens the file read-only with bbolt itself and prints, as JSON on
// standard output, every bucket, key and value it finds plus bbolt's page statistics, so the
// tests can compare the Python reader against the real library and check that the file really
// has branch pages, overflow pages, inline buckets and free pages.
package main

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

// --- Atlantis's models (server/events/models), field names and types as Atlantis has them ---

// VCSHost is where a repository is hosted.
type VCSHost struct {
	Hostname string
	Type     int
}

// Repo is a VCS repository; CloneURL carries user:token@ in Atlantis.
type Repo struct {
	FullName          string
	Owner             string
	Name              string
	CloneURL          string
	SanitizedCloneURL string
	VCSHost           VCSHost
}

// PullRequest is a pull (merge) request.
type PullRequest struct {
	Num        int
	HeadCommit string
	URL        string
	HeadBranch string
	BaseBranch string
	Author     string
	State      int
	BaseRepo   Repo
}

// User is the VCS user who ran the command.
type User struct {
	Username string
	Teams    []string
}

// Project is a Terraform project of a repository.
type Project struct {
	ProjectName  string
	RepoFullName string
	Path         string
}

// ProjectLock is the value Atlantis stores under runLocks.
type ProjectLock struct {
	Project   Project
	Pull      PullRequest
	User      User
	Workspace string
	Time      time.Time
}

// ProjectStatus is one project of a pull's status.
type ProjectStatus struct {
	Workspace   string
	RepoRelDir  string
	ProjectName string
	Status      int
}

// PullStatus is the value Atlantis stores under pulls.
type PullStatus struct {
	Projects []ProjectStatus
	Pull     PullRequest
}

// --- the spec ---

type fill struct {
	Byte  string `json:"byte"`
	Count int    `json:"count"`
}

type operation struct {
	Op       string       `json:"op"`
	Bucket   []string     `json:"bucket"`
	Key      *string      `json:"key"`
	KeyHex   *string      `json:"keyHex"`
	Value    *string      `json:"value"`
	ValueHex *string      `json:"valueHex"`
	Fill     *fill        `json:"fill"`
	Lock     *ProjectLock `json:"lock"`
	Pull     *PullStatus  `json:"pull"`
}

type spec struct {
	Path         string        `json:"path"`
	PageSize     int           `json:"pageSize"`
	Transactions [][]operation `json:"transactions"`
}

func (o operation) key() ([]byte, error) {
	switch {
	case o.KeyHex != nil:
		return hex.DecodeString(*o.KeyHex)
	case o.Key != nil:
		return []byte(*o.Key), nil
	}
	return nil, fmt.Errorf("%s needs key or keyHex", o.Op)
}

func (o operation) value() ([]byte, error) {
	switch {
	case o.ValueHex != nil:
		return hex.DecodeString(*o.ValueHex)
	case o.Value != nil:
		return []byte(*o.Value), nil
	case o.Fill != nil:
		return []byte(strings.Repeat(o.Fill.Byte, o.Fill.Count)), nil
	case o.Lock != nil:
		return json.Marshal(o.Lock) // exactly as Atlantis's BoltDB.TryLock marshals it
	case o.Pull != nil:
		return json.Marshal(o.Pull) // as Atlantis's writePullToBucket
	}
	return nil, fmt.Errorf("%s needs value, valueHex, fill, lock or pull", o.Op)
}

// bucket walks (and with create, makes) the nested bucket path.
func bucket(tx *bolt.Tx, path []string, create bool) (*bolt.Bucket, error) {
	if len(path) == 0 {
		return nil, fmt.Errorf("empty bucket path")
	}
	var b *bolt.Bucket
	for i, name := range path {
		var err error
		switch {
		case create && i == 0:
			b, err = tx.CreateBucketIfNotExists([]byte(name))
		case create:
			b, err = b.CreateBucketIfNotExists([]byte(name))
		case i == 0:
			b = tx.Bucket([]byte(name))
		default:
			b = b.Bucket([]byte(name))
		}
		if err != nil {
			return nil, err
		}
		if b == nil {
			return nil, fmt.Errorf("no bucket %q", strings.Join(path[:i+1], "/"))
		}
	}
	return b, nil
}

func apply(tx *bolt.Tx, o operation) error {
	switch o.Op {
	case "createBucket":
		_, err := bucket(tx, o.Bucket, true)
		return err
	case "put", "putLock", "putPull":
		b, err := bucket(tx, o.Bucket, true)
		if err != nil {
			return err
		}
		k, err := o.key()
		if err != nil {
			return err
		}
		v, err := o.value()
		if err != nil {
			return err
		}
		return b.Put(k, v)
	case "delete":
		b, err := bucket(tx, o.Bucket, false)
		if err != nil {
			return err
		}
		k, err := o.key()
		if err != nil {
			return err
		}
		return b.Delete(k)
	case "deleteBucket":
		k, err := o.key()
		if err != nil {
			return err
		}
		if len(o.Bucket) == 0 {
			return tx.DeleteBucket(k)
		}
		b, err := bucket(tx, o.Bucket, false)
		if err != nil {
			return err
		}
		return b.DeleteBucket(k)
	}
	return fmt.Errorf("unknown op %q", o.Op)
}

// --- the dump ---

type dumpedBucket struct {
	Name    string           `json:"nameHex"`
	Items   [][2]string      `json:"items"` // [keyHex, valueHex] in bbolt's key order
	Buckets []*dumpedBucket  `json:"buckets"`
	Stats   bolt.BucketStats `json:"stats"`
}

func dump(b *bolt.Bucket, name []byte) (*dumpedBucket, error) {
	out := &dumpedBucket{Name: hex.EncodeToString(name), Items: [][2]string{}, Buckets: []*dumpedBucket{}}
	out.Stats = b.Stats()
	err := b.ForEach(func(k, v []byte) error {
		if v == nil { // a nested bucket
			child, err := dump(b.Bucket(k), k)
			if err != nil {
				return err
			}
			out.Buckets = append(out.Buckets, child)
			return nil
		}
		out.Items = append(out.Items, [2]string{hex.EncodeToString(k), hex.EncodeToString(v)})
		return nil
	})
	return out, err
}

type result struct {
	PageSize     int             `json:"pageSize"`
	Txid         int             `json:"txid"`
	FreePageN    int             `json:"freePageN"`
	PendingPageN int             `json:"pendingPageN"`
	Buckets      []*dumpedBucket `json:"buckets"`
}

func run() error {
	var s spec
	decoder := json.NewDecoder(os.Stdin)
	decoder.DisallowUnknownFields()
	if err := decoder.Decode(&s); err != nil {
		return fmt.Errorf("reading the spec: %w", err)
	}
	if s.Path == "" {
		return fmt.Errorf("the spec needs a path")
	}
	// The options Atlantis uses (server/core/db/boltdb.go), plus an optional page size.
	db, err := bolt.Open(s.Path, 0o600, &bolt.Options{Timeout: time.Second, PageSize: s.PageSize})
	if err != nil {
		return err
	}
	for i, ops := range s.Transactions {
		err := db.Update(func(tx *bolt.Tx) error {
			for j, o := range ops {
				if err := apply(tx, o); err != nil {
					return fmt.Errorf("transaction %d, operation %d (%s): %w", i, j, o.Op, err)
				}
			}
			return nil
		})
		if err != nil {
			_ = db.Close()
			return err
		}
	}
	// The freelist is only loaded by a writable handle: count free pages before closing it.
	stats := db.Stats()
	if err := db.Close(); err != nil {
		return err
	}

	db, err = bolt.Open(s.Path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		return err
	}
	defer db.Close()
	out := result{PageSize: db.Info().PageSize, Buckets: []*dumpedBucket{}}
	out.FreePageN, out.PendingPageN = stats.FreePageN, stats.PendingPageN
	err = db.View(func(tx *bolt.Tx) error {
		out.Txid = int(tx.ID())
		return tx.ForEach(func(name []byte, b *bolt.Bucket) error {
			d, err := dump(b, name)
			if err == nil {
				out.Buckets = append(out.Buckets, d)
			}
			return err
		})
	})
	if err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bboltwriter:", err)
		os.Exit(1)
	}
}
