// Command lockdb-bench times TryLock+Unlock pairs through Atlantis's own lock databases
// (BoltDB, Redis) and through the adapter on running lock services, in one run, and prints
// the results as JSON lines for bench/atlantis_adapter.py.
//
//	lockdb-bench -redis 127.0.0.1:6379 -service embedded=http://127.0.0.1:4142 -pairs 2000
//
// The cases run in alternating blocks, so drift (other load, caches warming) hits them alike.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/runatlantis/atlantis/server/core/boltdb"
	"github.com/runatlantis/atlantis/server/core/db"
	"github.com/runatlantis/atlantis/server/core/redis"
	"github.com/runatlantis/atlantis/server/events/models"

	"github.com/runatlantis/enhanced-locking/atlantis/lockdb"
)

type services []string

func (s *services) String() string     { return strings.Join(*s, ",") }
func (s *services) Set(v string) error { *s = append(*s, v); return nil }

type benchCase struct {
	name     string
	database db.Database
	lock     models.ProjectLock
	samples  []time.Duration
}

type result struct {
	Name        string  `json:"name"`
	Pairs       int     `json:"pairs"`
	PairsPerSec float64 `json:"pairsPerSec"`
	MeanUs      float64 `json:"meanUs"`
	P50Us       float64 `json:"p50Us"`
	P99Us       float64 `json:"p99Us"`
}

func main() {
	redisAddr := flag.String("redis", "", "host:port of a redis-server for Atlantis's Redis database")
	pairs := flag.Int("pairs", 2000, "TryLock+Unlock pairs per case")
	block := flag.Int("block", 100, "pairs per case before the next case runs")
	var svcs services
	flag.Var(&svcs, "service", "name=url of a running lock service (repeat)")
	flag.Parse()
	if err := run(*redisAddr, svcs, *pairs, *block); err != nil {
		fmt.Fprintln(os.Stderr, "lockdb-bench:", err)
		os.Exit(1)
	}
}

func run(redisAddr string, svcs services, pairs, block int) error {
	dir, err := os.MkdirTemp("", "lockdb-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir) //nolint:errcheck
	var cases []*benchCase
	add := func(name string, database db.Database) {
		project := models.NewProject("bench/"+name, "envs/prod", "prod")
		cases = append(cases, &benchCase{name: name, database: database, lock: models.ProjectLock{
			Project: project, Workspace: "default", User: models.User{Username: "bench"},
			Pull: models.PullRequest{Num: 1, URL: "https://github.com/bench/x/pull/1", Author: "bench",
				BaseRepo: models.Repo{FullName: "bench/" + name, Owner: "bench", Name: name,
					VCSHost: models.VCSHost{Hostname: "github.com", Type: models.Github}}},
		}})
	}
	bolt, err := boltdb.New(dir)
	if err != nil {
		return err
	}
	add("atlantis-boltdb", bolt)
	if redisAddr != "" {
		host, port, err := net.SplitHostPort(redisAddr)
		if err != nil {
			return err
		}
		portNum, _ := strconv.Atoi(port)
		r, err := redis.New(host, portNum, "", false, false, 0)
		if err != nil {
			return err
		}
		add("atlantis-redis", r)
	}
	for i, spec := range svcs {
		name, url, ok := strings.Cut(spec, "=")
		if !ok {
			return fmt.Errorf("-service %q: expected name=url", spec)
		}
		wrapped, err := boltdb.New(fmt.Sprintf("%s/wrapped-%d", dir, i))
		if err != nil {
			return err
		}
		adapter, err := lockdb.New(url, wrapped)
		if err != nil {
			return err
		}
		if err := adapter.Ping(); err != nil {
			return err
		}
		add(name, adapter)
	}
	// Warm up every case (connections, scripts, caches) before timing.
	for _, c := range cases {
		for range 50 {
			if err := pair(c, false); err != nil {
				return err
			}
		}
	}
	for done := 0; done < pairs; done += block {
		for _, c := range cases {
			for range min(block, pairs-done) {
				if err := pair(c, true); err != nil {
					return err
				}
			}
		}
	}
	enc := json.NewEncoder(os.Stdout)
	for _, c := range cases {
		if err := enc.Encode(summarize(c)); err != nil {
			return err
		}
	}
	return nil
}

func pair(c *benchCase, record bool) error {
	c.lock.Time = time.Now()
	start := time.Now()
	ok, _, err := c.database.TryLock(c.lock)
	if err != nil {
		return fmt.Errorf("%s: TryLock: %w", c.name, err)
	}
	if !ok {
		return fmt.Errorf("%s: TryLock of a free key was refused", c.name)
	}
	freed, err := c.database.Unlock(c.lock.Project, c.lock.Workspace)
	if err != nil {
		return fmt.Errorf("%s: Unlock: %w", c.name, err)
	}
	if freed == nil {
		return fmt.Errorf("%s: Unlock found no lock", c.name)
	}
	if record {
		c.samples = append(c.samples, time.Since(start))
	}
	return nil
}

func summarize(c *benchCase) result {
	sorted := append([]time.Duration(nil), c.samples...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	var total time.Duration
	for _, s := range sorted {
		total += s
	}
	us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
	at := func(q float64) time.Duration { return sorted[min(len(sorted)-1, int(q*float64(len(sorted)-1)+0.5))] }
	mean := total / time.Duration(len(sorted))
	return result{Name: c.name, Pairs: len(sorted), PairsPerSec: float64(len(sorted)) / total.Seconds(),
		MeanUs: us(mean), P50Us: us(at(0.5)), P99Us: us(at(0.99))}
}
