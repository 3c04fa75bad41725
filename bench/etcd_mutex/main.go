// Command etcd_mutex times etcd's own lock recipe, concurrency.Mutex from
// go.etcd.io/etcd/client/v3, as the anchor of bench/etcd_locking.py: sequential Lock+Unlock
// pairs on one key, and the hand-off from a holder's Unlock to a blocked waiter's Lock
// returning. It prints one JSON object on stdout.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

type result struct {
	PairsPerSecond float64   `json:"pairs_per_second"`
	Handoffs       []float64 `json:"handoffs"`
}

func main() {
	endpoints := flag.String("endpoints", "127.0.0.1:2379", "comma-separated etcd endpoints")
	prefix := flag.String("prefix", "/bench/go-mutex/", "key prefix of the locks")
	pairs := flag.Int("pairs", 1000, "sequential Lock+Unlock pairs")
	handoffs := flag.Int("handoffs", 100, "hand-offs to time")
	flag.Parse()
	if err := run(strings.Split(*endpoints, ","), *prefix, *pairs, *handoffs); err != nil {
		fmt.Fprintln(os.Stderr, "etcd_mutex:", err)
		os.Exit(1)
	}
}

func run(endpoints []string, prefix string, pairs, handoffs int) error {
	client, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second})
	if err != nil {
		return err
	}
	defer client.Close()
	ctx := context.Background()
	holder, err := concurrency.NewSession(client, concurrency.WithTTL(60))
	if err != nil {
		return err
	}
	defer holder.Close()
	waiter, err := concurrency.NewSession(client, concurrency.WithTTL(60))
	if err != nil {
		return err
	}
	defer waiter.Close()

	out := result{}
	mutex := concurrency.NewMutex(holder, prefix+"pairs")
	for i := 0; i < 50; i++ { // warm up the connection
		if err := pair(ctx, mutex); err != nil {
			return err
		}
	}
	started := time.Now()
	for i := 0; i < pairs; i++ {
		if err := pair(ctx, mutex); err != nil {
			return err
		}
	}
	out.PairsPerSecond = float64(pairs) / time.Since(started).Seconds()

	key := prefix + "handoff"
	for i := 0; i < handoffs; i++ {
		held := concurrency.NewMutex(holder, key)
		if err := held.Lock(ctx); err != nil {
			return err
		}
		wanted := concurrency.NewMutex(waiter, key)
		done := make(chan time.Time, 1)
		failed := make(chan error, 1)
		go func() {
			if err := wanted.Lock(ctx); err != nil {
				failed <- err
				return
			}
			done <- time.Now()
		}()
		// The waiter is queued once its key is written: two keys under the lock's prefix.
		for {
			answer, err := client.Get(ctx, key+"/", clientv3.WithPrefix(), clientv3.WithCountOnly())
			if err != nil {
				return err
			}
			if answer.Count >= 2 {
				break
			}
			time.Sleep(200 * time.Microsecond)
		}
		released := time.Now()
		if err := held.Unlock(ctx); err != nil {
			return err
		}
		select {
		case granted := <-done:
			out.Handoffs = append(out.Handoffs, granted.Sub(released).Seconds())
		case err := <-failed:
			return err
		}
		if err := wanted.Unlock(ctx); err != nil {
			return err
		}
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}

func pair(ctx context.Context, mutex *concurrency.Mutex) error {
	if err := mutex.Lock(ctx); err != nil {
		return err
	}
	return mutex.Unlock(ctx)
}
