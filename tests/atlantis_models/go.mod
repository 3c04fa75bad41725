module enhancedlocking.test/atlantismodels

go 1.26.5

require github.com/runatlantis/atlantis v0.47.1

require (
	github.com/google/uuid v1.6.0 // indirect
	go.uber.org/multierr v1.11.0 // indirect
	go.uber.org/zap v1.27.1 // indirect
)
