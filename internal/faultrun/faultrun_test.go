package faultrun

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestRounds(t *testing.T) {
	t.Setenv("RELIABILITY_LONG", "")
	assert.Equal(t, 20, Rounds(20, 200))
	t.Setenv("RELIABILITY_LONG", "1")
	assert.Equal(t, 200, Rounds(20, 200))
	assert.True(t, Long())
}

func TestRandReplaysTheSeed(t *testing.T) {
	t.Setenv("RELIABILITY_SEED", "42")
	a, b := Rand(t, 1), Rand(t, 1)
	for range 10 {
		assert.Equal(t, a.Uint64(), b.Uint64(), "one seed, one sequence")
	}
	assert.NotEqual(t, Rand(t, 1).Uint64(), Rand(t, 2).Uint64(), "streams differ")
}
