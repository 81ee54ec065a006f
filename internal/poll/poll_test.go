package poll

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestUntilReturnsOnceTheConditionHolds(t *testing.T) {
	calls := 0
	err := Until(t.Context(), time.Millisecond, func() bool { calls++; return calls == 3 })
	require.NoError(t, err)
	assert.Equal(t, 3, calls)
}

func TestUntilChecksAtOnce(t *testing.T) {
	calls := 0
	require.NoError(t, Until(t.Context(), time.Hour, func() bool { calls++; return true }))
	assert.Equal(t, 1, calls, "no interval before the first check")
}

func TestUntilEndsWithTheContext(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond)
	defer cancel()
	calls := 0
	err := Until(ctx, time.Millisecond, func() bool { calls++; return false })
	assert.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Greater(t, calls, 1)
}
