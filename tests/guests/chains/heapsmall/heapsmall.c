/* heapgraph (see ../heapgraph/heapgraph.c) in a memory capped small (see
 * build.flags): converting its heap needs more memory than is left, so
 * malloc() fails in the middle of an update, which must roll back with the
 * allocator's state as it was. */
#include "../heapgraph/heapgraph.c"
