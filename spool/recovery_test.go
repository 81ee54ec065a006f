package spool

import (
	"context"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// stored makes a spool in a new directory holding messages a-0..a-(n-1), closed, and returns
// the directory, its one segment's path and where each record starts.
func stored(t *testing.T, n int) (dir, seg string, offs []int64) {
	t.Helper()
	dir = t.TempDir()
	s, err := Open(dir, Options{})
	require.NoError(t, err)
	appendN(t, s, "a", 0, n)
	require.NoError(t, s.Close())
	files := segmentFiles(t, dir)
	require.Len(t, files, 1)
	data, err := os.ReadFile(files[0])
	require.NoError(t, err)
	for off := segmentHeader; off < int64(len(data)); {
		offs = append(offs, off)
		_, _, size, err := checkRecord(data[off:])
		require.NoError(t, err)
		off += int64(size)
	}
	require.Len(t, offs, n)
	return dir, files[0], offs
}

// copyDir copies a spool directory's files, keeping modes.
func copyDir(t *testing.T, from string) string {
	t.Helper()
	to := t.TempDir()
	entries, err := os.ReadDir(from)
	require.NoError(t, err)
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(from, e.Name()))
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(to, e.Name()), data, 0o600))
	}
	return to
}

func edit(t *testing.T, path string, change func([]byte) []byte) {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(path, change(data), 0o600))
}

// TestTornTailAtEveryByte cuts the last record off at every byte, as a crash mid-write
// can: Open keeps the records before it, drops and counts the torn one, cuts the file back
// to where the next append goes, and the spool goes on.
func TestTornTailAtEveryByte(t *testing.T) {
	src, seg, offs := stored(t, 3)
	info, err := os.Stat(seg)
	require.NoError(t, err)
	lastStart := offs[2]
	for cut := lastStart; cut < info.Size(); cut++ {
		dir := copyDir(t, src)
		path := filepath.Join(dir, filepath.Base(seg))
		require.NoError(t, os.Truncate(path, cut))
		s, err := Open(dir, Options{})
		require.NoError(t, err, "cut at %d", cut)
		st := s.Stats()
		wantTorn := int64(1)
		if cut == lastStart {
			wantTorn = 0 // a clean end: the record was never there
		}
		assert.Equal(t, wantTorn, st.Torn, "cut at %d", cut)
		assert.Equal(t, 2, st.Messages, "cut at %d", cut)
		after, err := os.Stat(path)
		require.NoError(t, err)
		assert.Equal(t, lastStart, after.Size(), "cut at %d: the torn tail is cut off", cut)
		appendN(t, s, "a", 3, 4)
		assert.Equal(t, []string{"a-0", "a-1", "a-3"}, mids(t, s, 3), "cut at %d", cut)
		require.NoError(t, s.Close())

		s, err = Open(dir, Options{})
		require.NoError(t, err)
		assert.Zero(t, s.Stats().Torn, "cut at %d: nothing torn the second time", cut)
		assert.Equal(t, 3, s.Stats().Messages)
		require.NoError(t, s.Close())
	}
}

// TestTornTailContents covers what a power cut leaves past the last whole record: blocks
// never written (zeros), or old bytes of the device.
func TestTornTailContents(t *testing.T) {
	src, seg, _ := stored(t, 3)
	for name, tail := range map[string][]byte{
		"zeros":        make([]byte, 4096),
		"garbage":      []byte(strings.Repeat("\xde\xad\xbe\xef", 300)),
		"huge length":  {0xff, 0xff, 0xff, 0x7f, 1, 2, 3, 4},
		"short header": {0x20, 0},
	} {
		t.Run(name, func(t *testing.T) {
			dir := copyDir(t, src)
			path := filepath.Join(dir, filepath.Base(seg))
			edit(t, path, func(b []byte) []byte { return append(b, tail...) })
			s := open(t, dir, Options{})
			assert.Equal(t, int64(1), s.Stats().Torn)
			assert.Equal(t, names("a", 0, 3), mids(t, s, 3))
			empty(t, s)
		})
	}
}

// TestDamageIsSkipped flips a byte inside a record, which a crash cannot do but a worn
// medium can: Open skips to the next intact record, keeps the file as it is, and counts it.
func TestDamageIsSkipped(t *testing.T) {
	src, seg, offs := stored(t, 5)
	dir := copyDir(t, src)
	path := filepath.Join(dir, filepath.Base(seg))
	edit(t, path, func(b []byte) []byte { b[offs[1]+20] ^= 0x40; return b })
	before, err := os.ReadFile(path)
	require.NoError(t, err)

	s := open(t, dir, Options{})
	assert.Equal(t, int64(1), s.Stats().Torn)
	assert.Equal(t, []string{"a-0", "a-2", "a-3", "a-4"}, mids(t, s, 4))
	empty(t, s)
	appendN(t, s, "a", 5, 6)
	assert.Equal(t, names("a", 5, 6), mids(t, s, 1))
	after, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, before, after[:len(before)], "damaged bytes are kept, not cut off")
}

// TestDamageFoundByNext damages a record on disk after Open has checked it: Next skips it,
// counts it, and whoever waits for it learns it is gone.
func TestDamageFoundByNext(t *testing.T) {
	dir, seg, offs := stored(t, 4)
	s := open(t, dir, Options{})
	f, err := os.OpenFile(seg, os.O_RDWR, 0)
	require.NoError(t, err)
	_, err = f.WriteAt([]byte{0xAA, 0xBB}, offs[1]+recordHeader+20)
	require.NoError(t, err)
	require.NoError(t, f.Close())

	assert.Equal(t, []string{"a-0", "a-2", "a-3"}, mids(t, s, 3))
	empty(t, s)
	st := s.Stats()
	assert.Equal(t, int64(1), st.Torn)
	assert.Equal(t, 3, st.Messages, "the lost record is not counted as queued")
	assert.ErrorIs(t, s.AwaitAck(context.Background(), 2), ErrDropped)
}

func TestDamageInOlderSegment(t *testing.T) {
	dir := t.TempDir()
	o := Options{MaxBytes: 1 << 20, SegmentBytes: 4 << 10}
	s := open(t, dir, o)
	appendN(t, s, "a", 0, 100)
	require.NoError(t, s.Close())
	files := segmentFiles(t, dir)
	require.Greater(t, len(files), 2)
	// The first segment's last bytes are damaged: its tail is skipped, not cut off.
	edit(t, files[0], func(b []byte) []byte { b[len(b)-3] ^= 1; return b })
	s = open(t, dir, o)
	assert.Equal(t, int64(1), s.Stats().Torn)
	// The first segment's last record is the one lost; everything else comes, in order.
	first := s.segs[0]
	lost := "a-" + strconv.Itoa(int(first.last)) // IDs count from 1, names from 0
	want := names("a", 0, 100)
	want = slices.DeleteFunc(want, func(m string) bool { return m == lost })
	assert.Equal(t, want, mids(t, s, 99))
	empty(t, s)
	info, err := os.Stat(files[0])
	require.NoError(t, err)
	assert.Greater(t, info.Size(), int64(3000), "an older segment is never truncated")
}

// TestUnusableFilesAreSetAside puts what is not a segment under segment names, and other
// files beside them: the first are renamed aside, the others left alone, and the good
// segment serves on.
func TestUnusableFilesAreSetAside(t *testing.T) {
	src, _, _ := stored(t, 2)
	dir := copyDir(t, src)
	_, otherSeg, _ := stored(t, 2) // IDs 1 and 2 again: out of this queue's order
	otherData, err := os.ReadFile(otherSeg)
	require.NoError(t, err)
	write := func(name string, data []byte) {
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), data, 0o600))
	}
	write(segmentName(100), []byte("PK\x03\x04 a zip file, not a segment"))
	write(segmentName(200), otherData)
	require.NoError(t, os.Mkdir(filepath.Join(dir, segmentName(300)), 0o700))
	write("README", []byte("notes"))
	write("00000000000000AA.seg", []byte("upper-case hex is not a name the spool writes"))
	write("x.seg", nil)

	s := open(t, dir, Options{})
	st := s.Stats()
	assert.Equal(t, 3, st.SetAside)
	assert.Equal(t, 2, st.Messages)
	assert.Equal(t, names("a", 0, 2), mids(t, s, 2))
	for _, name := range []string{"README", "00000000000000AA.seg", "x.seg"} {
		assert.FileExists(t, filepath.Join(dir, name), "foreign files are left alone")
	}
	aside, err := filepath.Glob(filepath.Join(dir, "*.seg.corrupt-*"))
	require.NoError(t, err)
	assert.Len(t, aside, 3)
	zip, err := filepath.Glob(filepath.Join(dir, segmentName(100)+".corrupt-*"))
	require.NoError(t, err)
	require.Len(t, zip, 1)
	data, err := os.ReadFile(zip[0])
	require.NoError(t, err)
	assert.Contains(t, string(data), "a zip file", "set aside byte for byte")
	appendN(t, s, "a", 2, 3)
	assert.Equal(t, names("a", 2, 3), mids(t, s, 1))
}

// TestUnwrittenLastSegment is a crash while a segment was being created: no bytes, or a
// header never written. The file goes; what was before it stays.
func TestUnwrittenLastSegment(t *testing.T) {
	src, _, _ := stored(t, 2)
	for name, data := range map[string][]byte{"empty": nil, "zeros": make([]byte, 100), "header only": []byte(segmentMagic), "header cut": []byte(segmentMagic[:3])} {
		t.Run(name, func(t *testing.T) {
			dir := copyDir(t, src)
			path := filepath.Join(dir, segmentName(3))
			require.NoError(t, os.WriteFile(path, data, 0o600))
			s := open(t, dir, Options{})
			assert.NoFileExists(t, path)
			assert.Zero(t, s.Stats().SetAside)
			assert.Equal(t, names("a", 0, 2), mids(t, s, 2))
			appendN(t, s, "a", 2, 3)
			assert.Equal(t, names("a", 2, 3), mids(t, s, 1))
		})
	}
}

// TestAckState damages the acknowledgement state: a torn newest slot falls back to the
// other, older one; both unreadable send everything again. Never a loss.
func TestAckState(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, Options{})
	appendN(t, s, "a", 0, 5)
	require.NoError(t, s.Ack(next(t, s).ID))
	require.NoError(t, s.Close()) // mark 2
	s = open(t, dir, Options{})
	require.NoError(t, s.Ack(next(t, s).ID))
	require.NoError(t, s.Close()) // mark 3, in the other slot

	// The newest state is the slot with the higher generation.
	data, err := os.ReadFile(filepath.Join(dir, ackName))
	require.NoError(t, err)
	newestSlot := 0
	if binary.LittleEndian.Uint64(data[ackSlotStride+4:]) > binary.LittleEndian.Uint64(data[4:]) {
		newestSlot = ackSlotStride
	}
	newest := copyDir(t, dir)
	edit(t, filepath.Join(newest, ackName), func(b []byte) []byte { b[newestSlot+13] ^= 1; return b })
	both := copyDir(t, dir)
	edit(t, filepath.Join(both, ackName), func(b []byte) []byte { b[0] ^= 1; b[ackSlotStride+5] ^= 1; return b })
	cut := copyDir(t, dir)
	require.NoError(t, os.Truncate(filepath.Join(cut, ackName), 10))
	gone := copyDir(t, dir)
	require.NoError(t, os.Remove(filepath.Join(gone, ackName)))
	notFile := copyDir(t, dir)
	require.NoError(t, os.Remove(filepath.Join(notFile, ackName)))
	require.NoError(t, os.Mkdir(filepath.Join(notFile, ackName), 0o700))

	for _, c := range []struct {
		name, dir string
		want      []string
	}{
		{"intact", dir, names("a", 2, 5)},
		{"newest slot torn", newest, names("a", 1, 5)},
		{"both slots damaged", both, names("a", 0, 5)},
		{"cut short", cut, names("a", 0, 5)},
		{"missing", gone, names("a", 0, 5)},
		{"not a file", notFile, names("a", 0, 5)},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := open(t, c.dir, Options{})
			assert.Equal(t, c.want, mids(t, s, len(c.want)))
			empty(t, s)
		})
	}
}

// failSync makes the next *n fdatasyncs of segment files fail.
func failSync(t *testing.T) *int {
	var n int
	real := fdatasync
	fdatasync = func(f *os.File) error {
		if n > 0 && strings.HasSuffix(f.Name(), segmentSuffix) {
			n--
			return &os.PathError{Op: "fdatasync", Path: f.Name(), Err: syscall.EIO}
		}
		return real(f)
	}
	t.Cleanup(func() { fdatasync = real })
	return &n
}

// TestFailedWriteIsUndone: an append whose fdatasync fails reports the error, and its bytes
// leave the disk, so the spool and the next Open hold only what was acknowledged.
func TestFailedWriteIsUndone(t *testing.T) {
	failures := failSync(t)
	dir := t.TempDir()
	o := Options{MaxBytes: 1 << 20, SegmentBytes: 4 << 10}
	s := open(t, dir, o)
	appendN(t, s, "a", 0, 2)
	seg := segmentFiles(t, dir)[0]
	before, err := os.Stat(seg)
	require.NoError(t, err)

	*failures = 1
	_, err = s.Append(context.Background(), msg("a", 2))
	require.ErrorIs(t, err, syscall.EIO)
	assert.NotErrorIs(t, err, ErrFull)
	after, err := os.Stat(seg)
	require.NoError(t, err)
	assert.Equal(t, before.Size(), after.Size(), "the segment is cut back")

	// Fill the segment to where the next message begins a new one, and fail that.
	rec, err := encodeRecord(msg("a", 3))
	require.NoError(t, err)
	n := 3
	for ; after.Size()+int64(len(rec)) <= o.SegmentBytes; n++ {
		appendN(t, s, "a", n, n+1)
		after, err = os.Stat(seg)
		require.NoError(t, err)
	}
	*failures = 1
	_, err = s.Append(context.Background(), msg("a", n))
	require.ErrorIs(t, err, syscall.EIO)
	assert.Len(t, segmentFiles(t, dir), 1, "the segment begun for it is removed")
	appendN(t, s, "a", n+1, n+2)
	assert.Len(t, segmentFiles(t, dir), 2)

	want := append(names("a", 0, 2), names("a", 3, n)...)
	want = append(want, "a-"+strconv.Itoa(n+1))
	assert.Equal(t, want, mids(t, s, len(want)))
	empty(t, s)
	require.NoError(t, s.Close())
	s = open(t, dir, o)
	assert.Zero(t, s.Stats().Torn)
	assert.Equal(t, want, mids(t, s, len(want)))
	empty(t, s)
}

// TestUndoFailingBreaksAppends: when the undo fails too, the spool cannot know what its last
// segment holds, and refuses appends until it is opened again.
func TestUndoFailingBreaksAppends(t *testing.T) {
	failures := failSync(t)
	dir := t.TempDir()
	s := open(t, dir, Options{})
	appendN(t, s, "a", 0, 1)
	*failures = 2
	_, err := s.Append(context.Background(), msg("a", 1))
	require.ErrorIs(t, err, syscall.EIO)
	_, err = s.Append(context.Background(), msg("a", 2))
	require.ErrorContains(t, err, "could not be undone")
	assert.Equal(t, names("a", 0, 1), mids(t, s, 1), "what was stored is still served")
	require.NoError(t, s.Close())

	s = open(t, dir, Options{})
	got := mids(t, s, s.Stats().Messages)
	assert.Equal(t, "a-0", got[0])
	// The failed message's bytes may have reached the disk after all; it is then sent too.
	assert.LessOrEqual(t, len(got), 2)
	appendN(t, s, "a", 3, 4)
	assert.Equal(t, names("a", 3, 4), mids(t, s, 1))
}

// TestFileSystemFull runs the spool on a real 256 KiB tmpfs with a limit above it: the full
// file system refuses with ErrFull, nothing stored is lost, and acknowledging makes room.
func TestFileSystemFull(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "spool")
	require.NoError(t, os.Mkdir(dir, 0o700))
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", dir).CombinedOutput(); err != nil {
		if os.Getenv("UNICITY_TEST_STRICT") == "1" && os.Geteuid() == 0 {
			t.Fatalf("mount tmpfs: %v: %s", err, out)
		}
		t.Skipf("cannot mount a tmpfs (%v: %s): needs root", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })

	o := Options{MaxBytes: 1 << 20, SegmentBytes: 16 << 10}
	s := open(t, dir, o)
	var n int
	var err error
	for n = 0; n < 5000; n++ {
		if _, err = s.Append(context.Background(), bigMsg(n)); err != nil {
			break
		}
	}
	require.ErrorIs(t, err, ErrFull)
	require.ErrorIs(t, err, syscall.ENOSPC)
	assert.ErrorContains(t, err, "file system is full")
	assert.Equal(t, n, s.Stats().Messages)

	for range 100 {
		require.NoError(t, s.Ack(next(t, s).ID))
	}
	require.NoError(t, s.Close()) // the writer has removed the acknowledged segments
	s = open(t, dir, o)
	assert.Zero(t, s.Stats().Torn)
	assert.Equal(t, n-100, s.Stats().Messages)
	_, err = s.Append(context.Background(), bigMsg(n))
	require.NoError(t, err, "room again once acknowledged segments are gone")
	got := mids(t, s, n-99)
	assert.Equal(t, "a-100", got[0])
	assert.Equal(t, "a-"+strconv.Itoa(n), got[len(got)-1])
}
