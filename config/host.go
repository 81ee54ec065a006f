package config

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"strconv"
	"syscall"
)

// HostCheck is one check of what the configuration names on this system, beyond the file
// itself: `unicity run` refuses to start when one fails, and `unicity check` shows each.
type HostCheck struct {
	Name string
	// Check returns what it found, or why the agent refuses it (a *Error).
	Check func() (string, error)
}

// AnyOwner is the uid for HostChecks run by a command other than the agent: it cannot tell
// which user the service runs as, so it leaves the directories' owners to the agent.
const AnyOwner = -1

// HostChecks are the checks for an agent running as uid (or see AnyOwner).
func (c *Config) HostChecks(uid int) []HostCheck {
	return []HostCheck{
		{"api group", c.checkAPIGroup},
		{"state dir", func() (string, error) { return c.checkDir("state.dir", c.State.Dir, uid) }},
		{"runtime dir", func() (string, error) { return c.checkDir("runtime.dir", c.Runtime.Dir, uid) }},
		{"telemetry dir", func() (string, error) { return c.checkDir("telemetry.dir", c.Telemetry.Dir, uid) }},
	}
}

// APIGroupID is the ID of [api] group, the group the API socket is given to; -1 when none is
// set.
func (c *Config) APIGroupID() (int, error) {
	if c.API.Group == "" {
		return -1, nil
	}
	g, err := user.LookupGroup(c.API.Group)
	if err != nil {
		return -1, &Error{File: c.Path, Key: "api.group", Err: err}
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return -1, &Error{File: c.Path, Key: "api.group", Err: fmt.Errorf("group %s has the non-numeric ID %q", c.API.Group, g.Gid)}
	}
	return gid, nil
}

func (c *Config) checkAPIGroup() (string, error) {
	gid, err := c.APIGroupID()
	switch {
	case err != nil:
		return "", err
	case gid < 0:
		return "not set: the API socket keeps the service's group", nil
	}
	return fmt.Sprintf("%s (gid %d) may use the API socket", c.API.Group, gid), nil
}

// checkDir refuses a directory that someone other than root and the agent's user (uid) could
// change: writable by every user, or owned by another user. They could replace the stored
// assignment (sending the device to a hub of theirs), its identity files, or the API socket
// that gateway applications trust. A directory that does not exist yet is created private.
func (c *Config) checkDir(key, dir string, uid int) (string, error) {
	fi, err := os.Stat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Sprintf("%s does not exist yet: the agent creates it", dir), nil
	}
	if err != nil {
		return "", &Error{File: c.Path, Key: key, Err: err}
	}
	if !fi.IsDir() {
		return "", &Error{File: c.Path, Key: key, Err: fmt.Errorf("%s is not a directory", dir)}
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Sprintf("%s: mode %04o", dir, fi.Mode().Perm()), nil
	}
	mode, owner := st.Mode&0o7777, int(st.Uid)
	if mode&0o002 != 0 {
		return "", &Error{File: c.Path, Key: key, Err: fmt.Errorf(
			"%s is writable by every user (mode %04o): any of them could change what the agent keeps there; fix: chmod o-w %s", dir, mode, dir)}
	}
	if uid >= 0 && owner != 0 && owner != uid {
		runs := "root or by " + userName(uid)
		if uid == 0 {
			runs = "root"
		}
		return "", &Error{File: c.Path, Key: key, Err: fmt.Errorf(
			"%s is owned by %s, not by %s, which runs the agent: that user could change what the agent keeps there; fix: chown %s %s", dir, userName(owner), runs, chownName(uid), dir)}
	}
	return fmt.Sprintf("%s: owned by %s, mode %04o", dir, userName(owner), mode), nil
}

// chownName is uid as chown takes it: the user's name, or the number.
func chownName(uid int) string {
	if u, err := user.LookupId(strconv.Itoa(uid)); err == nil {
		return u.Username
	}
	return strconv.Itoa(uid)
}

// userName is uid as "name (uid N)", or "uid N" for a user without a name.
func userName(uid int) string {
	if u, err := user.LookupId(strconv.Itoa(uid)); err == nil {
		return fmt.Sprintf("%s (uid %d)", u.Username, uid)
	}
	return fmt.Sprintf("uid %d", uid)
}
