package ownsuite_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/runatlantis/enhanced-locking/atlantis/internal/servicetest"
)

const atlantisModule = "github.com/runatlantis/atlantis"

// suite is one of Atlantis's lock-database test files and how its constructors are replaced.
type suite struct {
	pkg string // the package directory in Atlantis's module
	// constructors are the functions of the file replaced by ours, by name.
	constructors []string
	// ours is the Go source of the replacements, appended as adapter_test.go.
	ours string
}

var suites = []suite{
	{
		pkg:          "server/core/boltdb",
		constructors: []string{"newTestDB", "newTestDB2"},
		ours: `package boltdb_test

import (
	"fmt"
	"os"
	"testing"

	"github.com/runatlantis/atlantis/server/core/boltdb"
	"github.com/runatlantis/enhanced-locking/atlantis/lockdb"
	bolt "go.etcd.io/bbolt"
)

// newTestDB is Atlantis's, with the BoltDB it opens wrapped by the adapter.
func newTestDB() (*bolt.DB, *lockdb.Database) {
	f, err := os.CreateTemp("", "")
	if err != nil {
		panic(fmt.Errorf("failed to create temp file: %w", err))
	}
	path := f.Name()
	f.Close() // nolint: errcheck
	boltDB, err := bolt.Open(path, 0600, nil)
	if err != nil {
		panic(fmt.Errorf("could not start bolt DB: %w", err))
	}
	if err := boltDB.Update(func(tx *bolt.Tx) error {
		if _, err := tx.CreateBucketIfNotExists([]byte(lockBucket)); err != nil {
			return err
		}
		_, err := tx.CreateBucketIfNotExists([]byte(configBucket))
		return err
	}); err != nil {
		panic(err)
	}
	b, _ := boltdb.NewWithDB(boltDB, lockBucket, configBucket)
	return boltDB, adapter(b, path)
}

func newTestDB2(t *testing.T) *lockdb.Database {
	dir := t.TempDir()
	b, err := boltdb.New(dir)
	if err != nil {
		t.Fatal(err)
	}
	return adapter(b, dir)
}
`,
	},
	{
		pkg:          "server/core/redis",
		constructors: []string{"newTestRedis"},
		ours: `package redis_test

import (
	"fmt"

	"github.com/alicebob/miniredis/v2"
	"github.com/runatlantis/atlantis/server/core/redis"
	"github.com/runatlantis/enhanced-locking/atlantis/lockdb"
)

// newTestRedis is Atlantis's, with the RedisDB it opens wrapped by the adapter.
func newTestRedis(mr *miniredis.Miniredis) *lockdb.Database {
	r, err := redis.New(mr.Host(), mr.Server().Addr().Port, "", false, false, 0)
	if err != nil {
		panic(fmt.Errorf("failed to create test redis client: %w", err))
	}
	// A test that opens a second client on the same miniredis simulates a restart: the
	// lock space is emptied only when a test opens its first one.
	return adapter(r, mr.Addr())
}
`,
	},
}

// adapterSource is shared by both packages: the adapter on the service the outer test
// started. Each of Atlantis's tests starts from an empty database, so the service's lock
// space is emptied the first time a test opens a given database (named by store).
const adapterSource = `package %s

import (
	"context"
	"os"

	"github.com/runatlantis/atlantis/server/core/db"
	"github.com/runatlantis/enhanced-locking/atlantis/lockdb"
)

var opened = map[string]bool{}

func adapter(wrapped db.Database, store string) *lockdb.Database {
	database, err := lockdb.New(os.Getenv("ENHANCED_LOCKING_TEST_URL"), wrapped)
	if err != nil {
		panic(err)
	}
	if opened[store] {
		return database
	}
	opened[store] = true
	ctx := context.Background()
	locks, err := database.Client().List(ctx, client.ListFilter{})
	if err != nil {
		panic(err)
	}
	for _, l := range locks {
		if _, err := database.Client().ForceUnlock(ctx, l.Key, "ownsuite: clear between cases"); err != nil {
			panic(err)
		}
	}
	return database
}
`

func goEnv(t *testing.T, dir string, args ...string) string {
	t.Helper()
	cmd := exec.Command("go", args...)
	cmd.Dir = dir
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go %s: %v", strings.Join(args, " "), err)
	}
	return strings.TrimSpace(string(out))
}

// dropFunc removes the top-level function name from Go source (up to its closing brace at
// the start of a line).
func dropFunc(t *testing.T, src, name string) string {
	t.Helper()
	re := regexp.MustCompile(`(?ms)^func ` + regexp.QuoteMeta(name) + `\(.*?^}\n`)
	if !re.MatchString(src) {
		t.Fatalf("Atlantis's test file has no func %s: its layout changed", name)
	}
	return re.ReplaceAllString(src, "")
}

var testFunc = regexp.MustCompile(`(?m)^func (Test\w*)\(t \*testing\.T\)`)

// writeSuite builds the throw-away module (ours replaced to this module's directory) and
// answers how many tests each package has.
func writeSuite(t *testing.T) (string, map[string]int) {
	t.Helper()
	moduleDir := goEnv(t, ".", "list", "-m", "-f", "{{.Dir}}")
	atlantisDir := goEnv(t, ".", "list", "-m", "-f", "{{.Dir}}", atlantisModule)
	version := goEnv(t, ".", "list", "-m", "-f", "{{.Version}}", atlantisModule)
	work := t.TempDir()
	gomod := fmt.Sprintf("module enhancedlocking.test/ownsuite\n\ngo 1.26.5\n\nrequire (\n\t%s %s\n"+
		"\tgithub.com/runatlantis/enhanced-locking/atlantis v0.0.0\n)\n\n"+
		"replace github.com/runatlantis/enhanced-locking/atlantis => %s\n", atlantisModule, version, moduleDir)
	must(t, os.WriteFile(filepath.Join(work, "go.mod"), []byte(gomod), 0o644))
	sums, err := os.ReadFile(filepath.Join(moduleDir, "go.sum"))
	must(t, err)
	must(t, os.WriteFile(filepath.Join(work, "go.sum"), sums, 0o644))
	counts := map[string]int{}
	for _, s := range suites {
		name := filepath.Base(s.pkg)
		dir := filepath.Join(work, name)
		must(t, os.MkdirAll(dir, 0o755))
		src, err := os.ReadFile(filepath.Join(atlantisDir, s.pkg, name+"_test.go"))
		must(t, err)
		text := string(src)
		for _, fn := range s.constructors {
			text = dropFunc(t, text, fn)
		}
		counts[name] = len(testFunc.FindAllString(text, -1))
		must(t, os.WriteFile(filepath.Join(dir, name+"_test.go"), []byte(text), 0o644))
		must(t, os.WriteFile(filepath.Join(dir, "adapter_test.go"), []byte(s.ours), 0o644))
		shared := strings.Replace(fmt.Sprintf(adapterSource, name+"_test"),
			`"github.com/runatlantis/enhanced-locking/atlantis/lockdb"`,
			"\"github.com/runatlantis/enhanced-locking/atlantis/client\"\n\t\"github.com/runatlantis/enhanced-locking/atlantis/lockdb\"", 1)
		must(t, os.WriteFile(filepath.Join(dir, "service_test.go"), []byte(shared), 0o644))
	}
	return work, counts
}

type testEvent struct {
	Action  string
	Package string
	Test    string
	Output  string
}

func TestAtlantisOwnLockDatabaseTestsPassAgainstTheAdapter(t *testing.T) {
	work, counts := writeSuite(t)
	for _, store := range []struct {
		name string
		args func() []string
	}{
		{"embedded", func() []string { return nil }},
		{"redis", func() []string { return servicetest.RedisArgs(servicetest.Redis(t)) }},
	} {
		t.Run(store.name, func(t *testing.T) {
			svc := servicetest.Serve(t, store.args()...)
			cmd := exec.Command("go", "test", "-count=1", "-p=1", "-json", "./...")
			cmd.Dir = work
			cmd.Env = append(os.Environ(), "ENHANCED_LOCKING_TEST_URL="+svc.URL, "GOFLAGS=-mod=mod")
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			out, runErr := cmd.Output()
			passed := map[string]int{}
			var failed []string
			var output strings.Builder
			for _, line := range bytes.Split(out, []byte("\n")) {
				var ev testEvent
				if json.Unmarshal(line, &ev) != nil {
					continue
				}
				output.WriteString(ev.Output)
				if ev.Test == "" && ev.Action == "fail" {
					failed = append(failed, "package "+filepath.Base(ev.Package))
				}
				if ev.Test == "" || strings.Contains(ev.Test, "/") {
					continue
				}
				switch ev.Action {
				case "pass":
					passed[filepath.Base(ev.Package)]++
				case "fail":
					failed = append(failed, filepath.Base(ev.Package)+"."+ev.Test)
				}
			}
			if runErr != nil || len(failed) > 0 {
				t.Fatalf("Atlantis's tests failed against the adapter: %v %v\n%s\n%s", runErr, failed,
					failures(output.String()), tail(stderr.String()))
			}
			// Every test of both files ran and passed: a suite that ran fewer must not pass.
			if fmt.Sprint(passed) != fmt.Sprint(counts) || counts["boltdb"] < 30 || counts["redis"] < 30 {
				t.Fatalf("not every one of Atlantis's tests passed: passed %v of %v", passed, counts)
			}
			t.Logf("Atlantis's own tests passed against the adapter: %v", passed)
		})
	}
}

// failures is the output around each failure (the whole output can be long).
func failures(s string) string {
	var b strings.Builder
	lines := strings.Split(s, "\n")
	for i, line := range lines {
		if strings.Contains(line, "--- FAIL") || strings.Contains(line, "[build failed]") ||
			strings.HasPrefix(line, "#") || strings.Contains(line, ".go:") && !strings.Contains(line, "PASS") {
			start := max(0, i-2)
			b.WriteString(strings.Join(lines[start:i+1], "\n") + "\n")
		}
	}
	return tail(b.String())
}

func tail(s string) string {
	if len(s) > 6000 {
		return "..." + s[len(s)-6000:]
	}
	return s
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
