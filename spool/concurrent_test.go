package spool

import (
	"context"
	"math/rand/v2"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestConcurrentAppendersAndSender appends from eight goroutines while a sender keeps a
// window in flight, acknowledges out of order and reconnects now and then, and others wait
// for acknowledgements and read the figures. Run it with -race. Everything is delivered, in
// order per application on every connection, and the queue ends empty.
func TestConcurrentAppendersAndSender(t *testing.T) {
	s := open(t, t.TempDir(), Options{MaxBytes: 4 << 20, SegmentBytes: 8 << 10})
	const apps, each = 8, 150
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	var appenders, waiters sync.WaitGroup
	for a := range apps {
		appenders.Add(1)
		go func() {
			defer appenders.Done()
			app := "app" + strconv.Itoa(a)
			for n := range each {
				id, err := s.Append(ctx, msg(app, n))
				if !assert.NoError(t, err) {
					return
				}
				if n%25 == 0 {
					waiters.Add(1)
					go func() {
						defer waiters.Done()
						assert.NoError(t, s.AwaitAck(ctx, id))
					}()
				}
			}
		}()
	}
	stop, statsDone := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(statsDone)
		for {
			st := s.Stats()
			assert.GreaterOrEqual(t, st.Messages, st.InFlight)
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()

	rng := rand.New(rand.NewPCG(1, 2))
	firstSeen := map[string]bool{}
	lastNew := map[string]int{}
	lastOnConn := map[string]int{}
	var window []Record
	for len(firstSeen) < apps*each {
		r, err := s.Next(ctx)
		require.NoError(t, err, "%d of %d delivered", len(firstSeen), apps*each)
		n, err := strconv.Atoi(r.Properties["seq"])
		require.NoError(t, err)
		if prev, ok := lastOnConn[r.App]; ok {
			require.Greater(t, n, prev, "%s out of order on one connection", r.Properties["$.mid"])
		}
		lastOnConn[r.App] = n
		if mid := r.Properties["$.mid"]; !firstSeen[mid] {
			firstSeen[mid] = true
			if prev, ok := lastNew[r.App]; ok {
				require.Greater(t, n, prev, "%s first delivered out of order", mid)
			}
			lastNew[r.App] = n
		}
		window = append(window, r)
		for len(window) >= 32 || len(window) > 0 && rng.IntN(4) == 0 {
			i := rng.IntN(len(window))
			require.NoError(t, s.Ack(window[i].ID))
			window = append(window[:i], window[i+1:]...)
		}
		if rng.IntN(100) == 0 {
			s.Requeue()
			window = nil
			clear(lastOnConn)
		}
	}
	appenders.Wait()
	for _, r := range window {
		require.NoError(t, s.Ack(r.ID))
	}
	// Redeliveries after the last reconnect still need their acknowledgements.
	for s.Stats().Messages > 0 {
		r, err := s.Next(ctx)
		require.NoError(t, err)
		require.NoError(t, s.Ack(r.ID))
	}
	waiters.Wait()
	close(stop)
	<-statsDone
	st := s.Stats()
	assert.Zero(t, st.Messages)
	assert.Zero(t, st.InFlight)
}
