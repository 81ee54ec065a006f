package uuid_test

import (
	"regexp"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/unicity-iot/unicity/internal/uuid"
)

func TestNew(t *testing.T) {
	v4 := regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
	seen := map[string]bool{}
	for range 1000 {
		id := uuid.New()
		assert.Regexp(t, v4, id)
		assert.False(t, seen[id], "repeated %s", id)
		seen[id] = true
	}
}
