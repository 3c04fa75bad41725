// Command atlantismodels answers questions with Atlantis's own code (models from
// github.com/runatlantis/atlantis v0.47.1), for the tests of the lock service's key and
// stored JSON. It reads one JSON request on stdin and writes one JSON answer on stdout:
//
//	{"paths": ["envs/net/", ...]}  -> {"paths": [models.NewProject(...).Path, ...]}
//	{"locks": ["<stored JSON>"]}   -> {"locks": [what Atlantis reads from each lock]}
//	{"repoConfig": "repos.yaml"}   -> {"repoConfig": what config.ParserValidator makes of it}
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/runatlantis/atlantis/server/core/config"
	"github.com/runatlantis/atlantis/server/core/config/valid"
	"github.com/runatlantis/atlantis/server/events/models"
)

type request struct {
	Paths      []string `json:"paths"`
	Locks      []string `json:"locks"`
	RepoConfig string   `json:"repoConfig"`
}

type stepView struct {
	Name       string `json:"name"`
	RunCommand string `json:"run,omitempty"`
}

type repoView struct {
	ID        string                `json:"id"`
	RepoLocks string                `json:"repoLocks,omitempty"`
	Workflow  string                `json:"workflow,omitempty"`
	Stages    map[string][]stepView `json:"stages,omitempty"`
}

// repoConfig parses a server-side repo config file as Atlantis does at start.
func repoConfig(path string) map[string]any {
	parser := &config.ParserValidator{}
	cfg, err := parser.ParseGlobalCfg(path, valid.NewGlobalCfgFromArgs(valid.GlobalCfgArgs{}))
	if err != nil {
		return map[string]any{"error": err.Error()}
	}
	repos := []repoView{}
	for _, repo := range cfg.Repos {
		view := repoView{ID: repo.ID}
		if repo.IDRegex != nil {
			view.ID = "/" + repo.IDRegex.String() + "/"
		}
		if repo.RepoLocks != nil {
			view.RepoLocks = string(repo.RepoLocks.Mode)
		}
		if repo.Workflow != nil {
			view.Workflow = repo.Workflow.Name
			view.Stages = map[string][]stepView{}
			for name, stage := range map[string]valid.Stage{
				"plan": repo.Workflow.Plan, "apply": repo.Workflow.Apply,
				"import": repo.Workflow.Import, "state_rm": repo.Workflow.StateRm} {
				for _, step := range stage.Steps {
					view.Stages[name] = append(view.Stages[name],
						stepView{Name: step.StepName, RunCommand: step.RunCommand})
				}
			}
		}
		repos = append(repos, view)
	}
	// Atlantis's own stages, which a workflow that does not name a stage runs.
	defaults := map[string][]stepView{}
	for name, stage := range map[string]valid.Stage{
		"plan": valid.DefaultPlanStage, "apply": valid.DefaultApplyStage,
		"import": valid.DefaultImportStage, "state_rm": valid.DefaultStateRmStage} {
		for _, step := range stage.Steps {
			defaults[name] = append(defaults[name], stepView{Name: step.StepName})
		}
	}
	return map[string]any{"repos": repos, "defaultStages": defaults}
}

type lockView struct {
	Error     string   `json:"error,omitempty"`
	Path      string   `json:"path"`
	Workspace string   `json:"workspace"`
	PullNum   int      `json:"pullNum"`
	PullURL   string   `json:"pullUrl"`
	Author    string   `json:"author"`
	PullKey   string   `json:"pullKey"`
	FullName  string   `json:"fullName"`
	Owner     string   `json:"owner"`
	Name      string   `json:"name"`
	VCSType   string   `json:"vcsType"`
	Username  string   `json:"username"`
	Teams     []string `json:"teams"`
	HasBase   bool     `json:"hasBaseRepo"`
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fmt.Fprintln(os.Stderr, "bad request:", err)
		os.Exit(2)
	}
	answer := map[string]any{}
	if req.Paths != nil {
		paths := make([]string, len(req.Paths))
		for i, p := range req.Paths {
			paths[i] = models.NewProject("owner/repo", p, "").Path
		}
		answer["paths"] = paths
	}
	if req.Locks != nil {
		views := make([]lockView, len(req.Locks))
		for i, raw := range req.Locks {
			var lock models.ProjectLock
			if err := json.Unmarshal([]byte(raw), &lock); err != nil {
				views[i] = lockView{Error: err.Error()}
				continue
			}
			base := lock.Pull.BaseRepo
			views[i] = lockView{
				Path:      lock.Project.Path,
				Workspace: lock.Workspace,
				PullNum:   lock.Pull.Num,
				PullURL:   lock.Pull.URL,
				Author:    lock.Pull.Author,
				// The key Atlantis's BoltDB and Redis databases keep a pull's status under.
				PullKey:  fmt.Sprintf("%s::%s::%d", base.VCSHost.Hostname, base.FullName, lock.Pull.Num),
				FullName: base.FullName,
				Owner:    base.Owner,
				Name:     base.Name,
				VCSType:  base.VCSHost.Type.String(),
				Username: lock.User.Username,
				Teams:    lock.User.Teams,
				// Atlantis's unlock skips discarding plans and commenting when this is false.
				HasBase: base != (models.Repo{}),
			}
		}
		answer["locks"] = views
	}
	if req.RepoConfig != "" {
		answer["repoConfig"] = repoConfig(req.RepoConfig)
	}
	if err := json.NewEncoder(os.Stdout).Encode(answer); err != nil {
		os.Exit(1)
	}
}
